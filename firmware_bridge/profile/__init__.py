"""`edgetrain profile`: the workload both sides run, the host session, the report, a simulated board."""

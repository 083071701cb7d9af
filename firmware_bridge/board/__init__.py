"""The board side: the agent (`edgetrain-agent`), its blob cache, its memory and power meter."""

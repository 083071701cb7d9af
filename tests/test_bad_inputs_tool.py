"""tools/bad_inputs.py keeps working: a few of its fastest cases through the harness against this tree."""
from __future__ import annotations

from pathlib import Path

from tools import bad_inputs

ROOT = Path(__file__).resolve().parents[1]
# refused by argparse or at load, before any training: about 2 s each
FAST = ("i05_pfq_eps_inf", "i14_load_none", "i12_info_garbage", "i13_demo_steps_0")


def test_the_catalogue_is_well_formed():
    ids = [c.id for c in bad_inputs.CASES]
    assert len(ids) == len(set(ids))
    assert {c.category for c in bad_inputs.CASES} == set(bad_inputs.CATEGORIES)
    assert {c.item for c in bad_inputs.CASES} >= set(range(1, 15))  # every numbered reproducer of issue 17
    assert all(c.id.startswith("i") for c in bad_inputs.CASES if c.item)


def test_fast_cases_are_clean_on_this_tree():
    cases = [c for c in bad_inputs.CASES if c.id in FAST]
    results = bad_inputs.run_cases(ROOT, cases, workers=2, progress=False)
    assert [(r["id"], r["outcome"], r["why"]) for r in results] == [(c.id, "clean", "") for c in cases]
    table = bad_inputs.markdown(results)
    assert "| API | 1 | 1 |" in table


def test_the_judge_catches_a_traceback_and_noise():
    case = bad_inputs.CASES[0]
    proc = bad_inputs.Proc(1, "", "Traceback (most recent call last):\n  ...\nValueError: x\n")
    problems = bad_inputs._judge_process(case, proc)
    assert "traceback" in problems and any("exit 1" in p for p in problems)
    stderr = "50%|#####     | 5/10 [00:01<00:01]\nedgetrain: warning: w\nedgetrain: error: e\n"
    assert bad_inputs.message_lines(stderr) == ["edgetrain: error: e"]

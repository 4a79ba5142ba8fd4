"""`anystory evaluate compare`: two evaluation runs paired character by character (no model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from anystory_cli import cli
from anystory_cli.errors import InputError
from anystory_cli.lab.evaluate import compare_adapter_runs, sign_test


def run(rights: list[list[bool]], seed: int = 0, variant: str = "anystory", blended=None) -> dict:
    """A minimal `evaluate adapter --json` result: one panel per list, one character per verdict."""
    panels = []
    for i, verdicts in enumerate(rights):
        judged = [{"right": r, "blended": bool(blended and blended[i][j])} for j, r in enumerate(verdicts)]
        panels.append({"scene_seed": 1000 * seed + i, "identity_seeds": list(range(len(verdicts))),
                       "judged": {variant: judged}})
    return {"seed": seed, "panels_per_count": 1, "variants": [variant], "panels": panels}


def test_sign_test_matches_the_binomial_tails():
    assert sign_test(0, 0) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32, abs=1e-4)  # 0 of 5 either way: 2 * (1/2)^5
    assert sign_test(7, 11) == sign_test(11, 7) == pytest.approx(0.4807, abs=1e-4)
    assert sign_test(81, 49) < 0.01


def test_sign_test_equals_the_exact_binomial_sum_on_every_small_split():
    from math import comb

    for trials in range(1, 41):
        for first in range(trials + 1):
            fewer = min(first, trials - first)
            exact = min(1.0, 2 * sum(comb(trials, k) for k in range(fewer + 1)) / 2 ** trials)
            assert sign_test(first, trials - first) == round(exact, 4), (first, trials - first)


def test_compare_pairs_characters_and_pools_counts():
    before = run([[True], [False], [True, False], [False, False, True]])
    after = run([[True], [True], [False, True], [True, False, True]], blended=[[0], [0], [1, 0], [0, 0, 0]])
    result = compare_adapter_runs([(before, after)])["by_count"]
    assert list(result) == ["1", "2", "3", "multi"]
    assert (result["1"]["right_before"], result["1"]["right_after"], result["1"]["only_after"]) == (1, 2, 1)
    # two characters: one right before only, the other right after only: rates equal, both moved
    assert result["2"]["identity_before"] == result["2"]["identity_after"] == 0.5
    assert (result["2"]["only_before"], result["2"]["only_after"]) == (1, 1)
    assert result["2"]["blended_after"] == 1 and result["multi"]["characters"] == 5
    assert result["multi"]["right_after"] == 3 and result["multi"]["right_before"] == 2


def test_compare_refuses_runs_of_different_panels():
    with pytest.raises(InputError, match="different panels"):
        compare_adapter_runs([(run([[True]], seed=0), run([[True]], seed=1))])
    with pytest.raises(InputError, match="'no_paste' was not drawn"):
        compare_adapter_runs([(run([[True]]), run([[True]]))], before="no_paste")


def test_cli_compare_prints_a_table_and_json(tmp_path):
    for name, rights in (("a", [[False], [True, True]]), ("b", [[True], [True, False]])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"ok": True, **run(rights)}))
    args = ["evaluate", "compare", "--before", str(tmp_path / "a.json"), "--after", str(tmp_path / "b.json")]
    table = CliRunner().invoke(cli.app, args)
    assert table.exit_code == 0, table.output
    assert "only before" in table.output and "2-4" in table.output
    data = json.loads(CliRunner().invoke(cli.app, [*args, "--json"]).output)
    assert data["by_count"]["1"]["only_after"] == 1 and data["by_count"]["2"]["only_before"] == 1


def test_cli_compare_bad_files_give_one_line(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"ok": True, "samples": 3}))
    for before, words in (("broken.json", "not JSON"), ("missing.json", "cannot read it"),
                          ("other.json", "not the output of")):
        result = CliRunner().invoke(cli.app, ["evaluate", "compare", "--before", str(tmp_path / before),
                                              "--after", str(tmp_path / "other.json")])
        assert result.exit_code == 1 and words in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

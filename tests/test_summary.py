"""The run summary reads the results for the user: whether the selection beat random and the random-heads
control, and whether training helped, in words next to the numbers (pure function of report.json)."""

from __future__ import annotations

from p2d_ray.demo import summary_lines

AER = {
    "label": "estimated",
    "aer": 0.4,
    "p2d_seconds": 40.0,
    "full_train_seconds": 100.0,
    "full_train_steps": 50,
    "n_full_rows": 2000,
}


def _report(selected, control, base_em, adapted_em, **extra) -> dict:
    return {
        "run_dir": "runs/x",
        "scorer": "influence",
        "heads": [[3, 1], [5, 0]],
        "selection_precision": {
            "k": 200,
            "n_corpus": 2000,
            "selected": selected,
            "base_rate": 0.2,
            "random_heads": control,
            "perplexity": 0.25,
        },
        "eval": {
            "n_samples": 400,
            "base": {"loss": 2.0, "perplexity": 7.39, "exact_match": base_em},
            "adapted": {"loss": 1.9, "perplexity": 6.69, "exact_match": adapted_em},
        },
        "aer": AER,
        "stage_seconds": {"score": 12.3},
        **extra,
    }


def test_a_good_run_says_so_with_the_numbers():
    text = "\n".join(summary_lines(_report(0.62, 0.18, 0.10, 0.20), {"total": 9.0}))
    assert "62.0% on-task among the 200 selected of 2,000 rows vs 20.0% base rate (3.1x random)" in text
    assert "better than random" in text and "WORSE" not in text
    assert "random-heads control: 18.0% -- task heads matter" in text
    assert "exact match 10.0% -> 20.0% (+10.0 points) -- training helped" in text
    assert "AER (estimated): 0.400" in text and "cheaper than full fine-tuning" in text


def test_the_selection_line_names_the_rule_that_ran():
    report = _report(0.62, 0.18, 0.10, 0.20, select_rule="relevance_then_quality")
    assert "selection (influence, relevance_then_quality): 62.0% on-task" in "\n".join(summary_lines(report))


def test_a_failed_run_says_so_plainly():
    text = "\n".join(summary_lines(_report(0.0, 0.01, 0.20, 0.10)))
    assert "0.0% on-task" in text and "WORSE than random" in text
    assert "task heads do NOT beat random heads (within noise)" in text
    assert "training made it WORSE" in text


def test_noise_is_not_called_a_win():
    # 22% vs 20% on 200 rows is within two standard errors; 11% vs 10% exact match on 400 samples too.
    text = "\n".join(summary_lines(_report(0.22, 0.21, 0.10, 0.11)))
    assert "no better than random (within noise)" in text and "no clear change (within noise)" in text


def test_unlabelled_corpus_and_loss_only_eval():
    report = _report(0.5, None, 0.1, 0.1)
    report["selection_precision"] = None
    for v in report["eval"].values():
        if isinstance(v, dict):
            v.pop("exact_match")
    text = "\n".join(summary_lines(report))
    assert "no label column" in text and "held-out loss 2.0000 -> 1.9000 (-5.0%) -- training helped" in text

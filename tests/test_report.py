"""report.py: an arm against real-only seed by seed, in results.json and the results.md table."""

from __future__ import annotations

import json

from segsynth.report import format_paired, format_table, paired_with_real


def test_paired_differences_are_taken_at_the_same_seed_only():
    real = {"0": 54.49, "1": 54.09, "2": 52.19}
    arm = {"0": 55.36, "1": 56.28, "2": 55.10, "3": 50.00}  # seed 3 has no real-only twin: left out
    paired = paired_with_real(arm, real)
    assert paired == {"per_seed": {"0": 0.87, "1": 2.19, "2": 2.91}, "mean": 1.99, "above": 3, "seeds": 3}
    assert format_paired(paired) == "3/3 (+0.87 to +2.91)"
    # A seed below its twin counts against; a tie is not above.
    mixed = paired_with_real({"0": 54.00, "1": 54.09}, real)
    assert mixed["above"] == 0 and mixed["per_seed"] == {"0": -0.49, "1": 0.0}
    assert format_paired(paired_with_real({"1": 53.59}, real)) == "0/1 (-0.50)"
    assert paired_with_real({"7": 60.0}, real) is None and format_paired(None) == ""


def test_the_table_shows_the_seeds_above_real_beside_the_mean_difference():
    results = {"arms": {
        "real": {"mean": 53.59, "spread": 2.30, "miou": {"0": 54.49, "1": 54.09, "2": 52.19}, "vs_real_paired": None},
        "paste": {"mean": 55.58, "spread": 1.18, "miou": {"0": 55.36, "1": 56.28, "2": 55.10},
                  "vs_real_paired": paired_with_real({"0": 55.36, "1": 56.28, "2": 55.10},
                                                     {"0": 54.49, "1": 54.09, "2": 52.19}),
                  "synthetic_images": 367, "train_seconds": 4868.0}}}
    header, _, real_row, paste_row = format_table(results).splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    paste = dict(zip(columns, (cell.strip() for cell in paste_row.strip("|").split("|"))))
    real = dict(zip(columns, (cell.strip() for cell in real_row.strip("|").split("|"))))
    assert paste["vs real"] == "+1.99" and paste["seeds above real"] == "3/3 (+0.87 to +2.91)"
    assert real["seeds above real"] == "" and paste["train s"] == "4868"
    json.dumps(results)  # what collect_results stores stays plain JSON

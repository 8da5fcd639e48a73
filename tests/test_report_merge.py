"""Merging a store's export into the committed one: a cell re-run replaces its earlier result,
also when only the repeat count of a timing changed, and nothing else is dropped."""

from cestudy.report import data


def _cell(study, repeats, median, batch=4096):
    return {
        "study": study,
        "kind": "performance",
        "status": "ok",
        "run_id": 1,
        "p_variant": "cross_entropy",
        "p_batch": batch,
        "p_repeats": repeats,
        "median_s": median,
    }


def test_a_rerun_with_another_repeat_count_replaces_the_earlier_timing():
    previous = {
        "format": 1,
        "runs": [{"run_id": 1}],
        "cells": [_cell("bench", 7, 0.238), _cell("bench", 7, 0.01, batch=256)],
    }
    local = {"format": 1, "runs": [{"run_id": 1}], "cells": [_cell("bench", 5, 0.179)]}
    merged = data.merge_documents(previous, local)
    big = [c for c in merged["cells"] if c["p_batch"] == 4096]
    assert [c["median_s"] for c in big] == [0.179]
    # the cell the local store does not hold is kept
    assert [c["median_s"] for c in merged["cells"] if c["p_batch"] == 256] == [0.01]

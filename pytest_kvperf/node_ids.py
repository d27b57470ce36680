"""Node ids across baseline files recorded at different times: a test moved to another file.

`suites/compression/test_mx_nvfp4_quant.py::test_mxfp8_speed[65536x8x128]` (an old H100
file) is the test now at `suites/compression/test_mxfp8_quant.py::test_mxfp8_speed[...]`:
same folder, same test name and parameters, a unique candidate. Such pairs are matched so
that a diff or a per-GPU table compares them instead of listing one as removed and the
other as added; every match is reported, never applied silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def move_key(nodeid: str) -> tuple[str, str]:
    """(folder, 'test_name[params]' with any class): what stays when a test changes file."""
    path, _, rest = nodeid.partition("::")
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    return folder, rest


def match_moved(old_ids: Iterable[str], new_ids: Iterable[str]) -> dict[str, str]:
    """{old id: new id} for ids only on one side whose move_key has exactly one partner."""
    old_set, new_set = set(old_ids), set(new_ids)
    only_old, only_new = old_set - new_set, new_set - old_set
    by_key_old, by_key_new = defaultdict(list), defaultdict(list)
    for nodeid in only_old:
        by_key_old[move_key(nodeid)].append(nodeid)
    for nodeid in only_new:
        by_key_new[move_key(nodeid)].append(nodeid)
    return {olds[0]: by_key_new[key][0] for key, olds in by_key_old.items()
            if len(olds) == 1 and len(by_key_new.get(key, ())) == 1}


def canonical_ids(id_sets: list[tuple[str, Iterable[str]]]) -> dict[str, dict[str, str]]:
    """Per source name, {its id: the id it is shown under}, the first source's ids winning.

    Pass the most recent source first: an older file's moved test is shown under the
    id that the newer one uses.
    """
    known: set[str] = set()
    out: dict[str, dict[str, str]] = {}
    for name, ids in id_sets:
        ids = list(ids)
        moved = match_moved(ids, known)
        out[name] = {i: moved.get(i, i) for i in ids}
        known |= set(out[name].values())
    return out

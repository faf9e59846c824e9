"""The history record kept in documents (shared.doc_history): one format for both editors."""

import json

from shared import doc_history as dh


def entry(i, prompt="red coat"):
    return dh.Entry(prompt=f"{prompt} {i}", negative="blurry", seeds=(i, i + 1),
                    settings={"steps": 20, "cfg": 7.0, "condition": "lineart", "hires": False},
                    layers=((f"id-{i}", f"{prompt} {i} · seed {i}"),), time=1000.0 + i)


def test_record_round_trips_newest_first_and_is_small_json():
    data = dh.encode([entry(2), entry(1)])
    raw = json.loads(data)
    assert raw["format"] == "controlcanvas.history" and raw["version"] == dh.VERSION
    entries, problem = dh.decode(data)
    assert problem == "" and entries == [entry(2), entry(1)]
    assert entries[0].seed == 2 and b"pixels" not in data


def test_record_is_capped_in_entries_and_bytes_dropping_the_oldest():
    many = [entry(i) for i in range(50, 0, -1)]
    entries, _ = dh.decode(dh.encode(many))
    assert len(entries) == dh.MAX_ENTRIES and entries[0] == many[0]
    huge = [entry(i, prompt="x" * 1900) for i in range(20, 0, -1)]
    data = dh.encode(huge)
    assert len(data) <= dh.MAX_BYTES
    kept, problem = dh.decode(data)
    assert not problem and 0 < len(kept) < 20 and kept[0] == dh.decode(dh.encode(huge[:1]))[0][0]


def test_add_puts_the_new_entry_first_and_replaces_a_damaged_record():
    data, problem = dh.add(dh.encode([entry(1)]), entry(2))
    assert problem == "" and [e.seed for e in dh.decode(data)[0]] == [2, 1]
    data, problem = dh.add(b"\x00garbage", entry(3))
    assert "ignored" in problem and [e.seed for e in dh.decode(data)[0]] == [3]


def test_corrupt_or_foreign_records_are_ignored_with_a_sentence_never_an_exception():
    good = json.loads(dh.encode([entry(1)]))
    bad_entries = [
        {"prompt": 5}, {"seeds": ["7"]}, {"seeds": [True]}, {"settings": {"a": [1]}},
        {"settings": []}, {"layers": [["only-one"]]}, {"layers": [[1, 2]]}, {"time": "now"}, 3]
    cases = [b"\xff\xfe", b"not json", b"[]", b'"text"', b"{}",
             json.dumps({"format": "someone.else", "version": 1, "entries": []}).encode(),
             json.dumps(dict(good, version="1")).encode(),
             json.dumps(dict(good, version=0)).encode(),
             json.dumps(dict(good, entries={})).encode(),
             b"{" + b" " * dh.MAX_BYTES + b"}"]
    cases += [json.dumps(dict(good, entries=[e])).encode() for e in bad_entries]
    for data in cases:
        entries, problem = dh.decode(data)
        assert entries == [] and "ignored" in problem, (data[:60], problem)
    assert dh.decode(b"") == ([], "") and dh.decode(None) == ([], "")


def test_a_newer_record_version_is_left_untouched():
    newer = json.dumps({"format": dh.NAME, "version": dh.VERSION + 1, "entries": []}).encode()
    entries, problem = dh.decode(newer)
    assert entries == [] and "newer ControlCanvas" in problem
    data, problem = dh.add(newer, entry(1))
    assert data == b"" and "update the plug-in" in problem  # nothing is overwritten


def test_settings_summary_is_one_readable_line():
    assert dh.summary({"condition": "lineart", "steps": 20, "cfg": 7.0, "sampler": "euler"}) \
        == "lineart · steps 20 · cfg 7 · euler"

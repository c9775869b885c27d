"""The privacy core: keyed pseudonyms, refusal without a key, tombstone logic,
retention settings, the join-state eraser, the row reset and the stores' TTL rules."""
from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import torch
from hypothesis import given, strategies as st

from em3 import codec
from em3.config import load_settings
from em3.errors import ImproperlyConfigured
from em3.model import user_rows, reset_user_rows
from em3.privacy import (Pseudonymizer, RetentionConfig, TombstoneFilter, is_pseudonym, pseudonym, settle, start,
                         stores_erased, tombstone_id)
from em3.redis_stores import kept_versions
from em3.types import Impression, Tombstone
from stream.join import ImpressionState, JoinChanges
from stream.state import _delta_blob, erase_from_state


# -- pseudonyms ------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=64))
def test_a_pseudonym_is_hmac_sha256_of_the_raw_id_under_the_key(raw):
    want = hmac.new(b"secret", raw.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]
    assert pseudonym("secret", raw) == want == Pseudonymizer("secret")(raw)
    assert is_pseudonym(want)
    assert pseudonym("other", raw) != want  # another key, another pseudonym


def test_pseudonyms_are_stable_distinct_and_not_an_unkeyed_hash():
    p = Pseudonymizer("k")
    ids = [f"user-{n}" for n in range(10_000)]
    out = [p(u) for u in ids]
    assert out == [Pseudonymizer("k")(u) for u in ids]  # another process, same key: same pseudonyms
    assert len(set(out)) == len(ids)
    assert p("user-1") != hashlib.sha256(b"user-1").hexdigest()[:32]  # a dictionary attack needs the key


def test_the_unkeyed_path_is_refused_unless_raw_ids_are_explicitly_allowed():
    with pytest.raises(ImproperlyConfigured, match="EM3_USER_ID_KEY"):
        Pseudonymizer("")
    with pytest.raises(ImproperlyConfigured, match="EM3_USER_ID_KEY"):
        Pseudonymizer.from_settings(load_settings({"EM3_RUN_DIR": "/nonexistent"}))
    allowed = Pseudonymizer.from_settings(load_settings({"EM3_RUN_DIR": "/nonexistent",
                                                         "EM3_ALLOW_RAW_USER_IDS": "1"}))
    assert not allowed.keyed and allowed("alice") == "alice"
    keyed = Pseudonymizer.from_settings(load_settings({"EM3_RUN_DIR": "/nonexistent", "EM3_USER_ID_KEY": "k",
                                                       "EM3_ALLOW_RAW_USER_IDS": "1"}))
    assert keyed.keyed and keyed("alice") == pseudonym("k", "alice")  # a key always wins
    with pytest.raises(ImproperlyConfigured, match="PREVIOUS"):
        Pseudonymizer("", previous_key="old", allow_raw=True)


def test_keys_stay_out_of_repr_and_a_rotation_gives_both_pseudonyms():
    s = load_settings({"EM3_RUN_DIR": "/nonexistent", "EM3_USER_ID_KEY": "new-key",
                       "EM3_USER_ID_KEY_PREVIOUS": "old-key"})
    assert "new-key" not in repr(s) and "old-key" not in repr(s)
    p = Pseudonymizer.from_settings(s)
    assert p.rotating and p.all("alice") == [pseudonym("new-key", "alice"), pseudonym("old-key", "alice")]
    assert "key" not in repr(p).replace("keyed", "")


def test_services_json_carries_a_generated_user_id_key(tmp_path):
    from em3.app.services import LocalServices
    from em3.app.users import rotate_key_file

    services = LocalServices(tmp_path)
    services._write_info()
    doc = json.loads((tmp_path / "services.json").read_text())
    assert len(doc["user_id_key"]) >= 40
    assert load_settings({"EM3_RUN_DIR": str(tmp_path)}).user_id_key == doc["user_id_key"]
    assert rotate_key_file(tmp_path / "services.json") == {"rotation": "started", "has_previous_key": True}
    rotated = load_settings({"EM3_RUN_DIR": str(tmp_path)})
    assert rotated.user_id_key_previous == doc["user_id_key"] and rotated.user_id_key != doc["user_id_key"]
    with pytest.raises(ValueError, match="already under way"):
        rotate_key_file(tmp_path / "services.json")
    rotate_key_file(tmp_path / "services.json", finish=True)
    assert load_settings({"EM3_RUN_DIR": str(tmp_path)}).user_id_key_previous == ""


# -- tombstones ------------------------------------------------------------------------------


def test_a_tombstone_names_no_user_and_moves_requested_erasing_erased_complete():
    pid = pseudonym("k", "alice")
    tid = tombstone_id(pid)
    t = start(Tombstone(tid, 100.0), tid, 101.0)
    assert t.status == "erasing" and t.requested_at == 100.0  # the first request's time
    t = stores_erased(t, 105.0, {"history_keys": 1, "join_records": 3}, ["em3", "id_only"])
    assert (t.status, t.stores_erased_at, t.lines_expected) == ("stores_erased", 105.0, ["em3", "id_only"])
    half = settle(t, {"em3": (4, 106.0)})
    assert half.status == "stores_erased" and half.lines_reset == {"em3": 4} and half.completed_at is None
    done = settle(half, {"em3": (4, 106.0), "id_only": (9, 107.5)})
    assert done.status == "complete" and done.completed_at == 107.5
    assert settle(done, {}) == done and stores_erased(done, 200.0, {}, ["x"]).status == "complete"
    assert start(done, tid, 107.0) is None  # a redelivered request: nothing to do
    again = start(done, tid, 300.0)  # asked again later: a new erasure
    assert again.status == "erasing" and again.requested_at == 300.0
    assert tid != pid and pid.encode() not in codec.encode(done)  # the record never names the user


def test_a_line_that_stopped_is_not_waited_for_and_a_deletion_without_lines_completes_at_once():
    t = stores_erased(Tombstone("0" * 32, 100.0, "erasing"), 101.0, {}, ["em3", "gone"])
    done = settle(t, {"em3": (3, 102.0)}, active=["em3"])
    assert done.status == "complete" and done.lines_expected == ["em3"]
    assert done.erased["lines_not_waited_for"] == 1
    alone = settle(stores_erased(Tombstone("0" * 32, 100.0, "erasing"), 101.0, {}, []), {})
    assert alone.status == "complete" and alone.completed_at == 101.0


def test_the_tombstone_filter_refetches_only_when_the_store_changed():
    calls = []
    state = {"seq": 1, "tids": {tombstone_id("p1")}}

    def fetch(seq):
        calls.append(seq)
        return None if seq == state["seq"] else (state["seq"], set(state["tids"]))

    f = TombstoneFilter(fetch)
    assert not f.erased("p1")  # nothing fetched yet
    f.refresh()
    assert f.erased("p1") and not f.erased("p2")
    assert not f.refresh()  # unchanged
    state["seq"], state["tids"] = 2, {tombstone_id("p1"), tombstone_id("p2")}
    assert f.refresh() and f.erased("p2")
    assert calls == [None, 1, 1]
    f.add(["p3"])
    assert f.erased("p3")


# -- retention ---------------------------------------------------------------------------------


def test_retention_comes_from_the_environment_and_is_checked():
    r = load_settings({"EM3_RUN_DIR": "/nonexistent", "EM3_RETENTION_HISTORY_TTL_S": "3600",
                       "EM3_RETENTION_SNAPSHOT_MAX_AGE_S": "0"}).retention
    assert r.history_ttl_s == 3600.0 and r.snapshot_max_age_s is None and r.join_state_ttl_s == 7 * 86400
    with pytest.raises(ImproperlyConfigured, match="seconds"):
        load_settings({"EM3_RUN_DIR": "/nonexistent", "EM3_RETENTION_HISTORY_TTL_S": "a week"})
    with pytest.raises(ValueError, match="tombstone_ttl_s must be >= topic_retention_s"):
        RetentionConfig(tombstone_ttl_s=3600, topic_retention_s=7200)
    with pytest.raises(ValueError, match="history_ttl_s must be >= 1"):
        RetentionConfig(history_ttl_s=0.5)


def test_old_snapshot_versions_are_pruned_unless_the_pointer_needs_them():
    # v1 full, v2-v4 deltas on it, v5 full; all but v5 expired: v5 alone is kept.
    assert kept_versions([1, 2, 3, 4, 5], 10, 5, {2: 1, 3: 2, 4: 3}, expired=[1, 2, 3, 4]) == {5}
    # The pointer on a delta keeps its chain, however old.
    assert kept_versions([1, 2, 3], 10, 3, {2: 1, 3: 2}, expired=[1, 2, 3]) == {1, 2, 3}


# -- erasure in the stores and the model -------------------------------------------------------


def test_the_join_state_loses_every_record_and_held_click_of_an_erased_user():
    gone, kept = pseudonym("k", "alice"), pseudonym("k", "bob")
    recs = {}
    for n, user in enumerate([gone, kept, gone, kept]):
        imp = Impression(f"i{n}", "r", user, "x", 0, 1.7e9)
        recs[imp.impression_id] = ImpressionState(imp, "P" if n < 2 else "N")
    base = _delta_blob(JoinChanges(records=recs), full=True)
    from em3.types import Click

    held = JoinChanges(records={}, orphans={"o1": [(Click("o1", gone, "x", 1.7e9), 5)],
                                            "o2": [(Click("o2", kept, "x", 1.7e9), 6)]})
    new_base, removed = erase_from_state([base, _delta_blob(held)], {gone})
    assert removed["records"][gone] == 2 and removed["held_clicks"][gone] == 1
    assert gone.encode() not in new_base and new_base.count(kept.encode()) == 3
    again, nothing = erase_from_state([new_base], {gone})
    assert again == new_base and not nothing["records"]  # idempotent


def test_reset_user_rows_zeroes_every_row_of_the_user_and_nothing_else():
    buckets = 64
    state = {"user_emb.table.weight": torch.randn(buckets, 4), "user_impressions": torch.rand(buckets) + 1,
             "user_clicks": torch.rand(buckets) + 1, "item_emb.table.weight": torch.randn(buckets, 4)}
    before = {k: v.clone() for k, v in state.items()}
    [row] = user_rows(buckets, [pseudonym("k", "alice")])
    reset_user_rows(state, [row])
    for name in ("user_emb.table.weight", "user_impressions", "user_clicks"):
        assert bool((state[name][row] == 0).all())
        others = [r for r in range(buckets) if r != row]
        assert torch.equal(state[name][others], before[name][others])
    assert torch.equal(state["item_emb.table.weight"], before["item_emb.table.weight"])


def test_replay_refuses_to_produce_raw_user_ids_without_a_key(monkeypatch, capsys):
    from em3.app.cli import main

    monkeypatch.delenv("EM3_USER_ID_KEY", raising=False)
    monkeypatch.delenv("EM3_ALLOW_RAW_USER_IDS", raising=False)
    monkeypatch.setenv("EM3_RUN_DIR", "/nonexistent")
    assert main(["replay", "--obd", "all", "--no-progress", "--bootstrap-servers", "127.0.0.1:1"]) == 2
    assert "EM3_USER_ID_KEY" in capsys.readouterr().err

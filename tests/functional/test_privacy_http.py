"""The server as the privacy edge, through FastAPI's TestClient (one process, in-memory
stores, a recording producer): raw user IDs never leave it, ``DELETE /v1/users/{id}``
writes a deletion request to the deletions topic and ``GET .../deletion`` follows it
to the time erasure completed."""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from em3 import codec
from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames
from em3.errors import ImproperlyConfigured
from em3.experiment import ArmConfig, ExperimentConfig
from em3.privacy import Pseudonymizer, settle, stores_erased, tombstone_id
from em3.stores import InMemoryContentStore, InMemoryHistoryStore, InMemoryTombstones
from em3.types import ItemContent
from serving.app import create_app
from serving.server import ServerConfig, ServingRuntime
from serving.toy import ToyLoader

KEY, API = "user-id-key", "api-key"
RAW = "alice@example.com"


class RecordingProducer:
    """Like the server's producer (``delivery.report.only.error``): delivery reports
    for failures only; ``fail`` makes every record fail."""

    def __init__(self, fail: bool = False) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []
        self.lock = threading.Lock()
        self.fail = fail

    def produce(self, topic, value=None, key=None, on_delivery=None, **_):
        with self.lock:
            self.records.append((topic, key.encode() if isinstance(key, str) else key, value))
        if on_delivery is not None and self.fail:
            on_delivery("_MSG_TIMED_OUT", None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0


def _runtime(producer, tombstones, **settings_kw) -> ServingRuntime:
    settings = Settings(KafkaSettings("127.0.0.1:1"), RedisSettings("redis://127.0.0.1:1/0"), TopicNames("t."),
                        **settings_kw)
    experiment = ExperimentConfig("e", (ArmConfig("rnd", 1.0, "random"),))
    history = InMemoryHistoryStore()
    return ServingRuntime(ServerConfig(experiment, api_key=API), ToyLoader(), None,
                          InMemoryContentStore([ItemContent(f"i{n}") for n in range(5)]), history,
                          producer=producer, settings=settings, tombstones=tombstones)


@pytest.fixture
def parts():
    producer, tombstones = RecordingProducer(), InMemoryTombstones()
    runtime = _runtime(producer, tombstones, user_id_key=KEY)
    runtime.logger.start()
    yield TestClient(create_app(runtime)), runtime, producer, tombstones
    runtime.stop()


def test_raw_user_ids_never_leave_the_server(parts):
    client, runtime, producer, _ = parts
    out = client.post("/v1/rank", json={"user_id": RAW, "item_ids": ["i1", "i2", "i3"], "k": 2}).json()
    r = client.post("/v1/click", headers={"X-API-Key": API}, json={
        "impression_id": out["items"][0]["impression_id"], "user_id": RAW, "item_id": out["items"][0]["item_id"]})
    assert r.status_code == 202
    runtime.logger.flush(5.0)
    pseudonym = Pseudonymizer(KEY)(RAW)
    assert {t for t, _, _ in producer.records} == {"t.impressions", "t.clicks"}
    for topic, key, value in producer.records:
        assert RAW.encode() not in key and RAW.encode() not in value
        assert key == pseudonym.encode() and codec.decode(value).user_id == pseudonym


def test_delete_writes_a_request_and_the_status_follows_it_to_completion(parts):
    client, _, producer, tombstones = parts
    pseudonym = Pseudonymizer(KEY)(RAW)
    tid = tombstone_id(pseudonym)
    assert client.delete(f"/v1/users/{RAW}").status_code == 401  # a write: needs the API key
    assert client.get(f"/v1/users/{RAW}/deletion", headers={"X-API-Key": API}).status_code == 404

    r = client.delete(f"/v1/users/{RAW}", headers={"X-API-Key": API})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "requested" and r.json()["status_url"] == "/v1/users/alice%40example.com/deletion"
    [(topic, key, value)] = producer.records
    request = codec.decode_deletion_record(value)
    assert topic == "t.deletions" and key == tid.encode()  # keyed by the tombstone id (compaction)
    assert request.user_id == pseudonym and RAW.encode() not in value

    status = client.get(f"/v1/users/{RAW}/deletion", headers={"X-API-Key": API}).json()
    assert status["status"] == "requested" and status["completed_at"] is None
    # The deletion agent and a model line do their part (in Redis, in a deployment).
    tomb = settle(stores_erased(tombstones.status(tid), status["requested_at"] + 1.0, {"history_keys": 1}, ["em3"]),
                  {"em3": (12, status["requested_at"] + 2.5)})
    tombstones.save(tomb)
    status = client.get(f"/v1/users/{RAW}/deletion", headers={"X-API-Key": API}).json()
    assert status["status"] == "complete" and status["completed_at"] == status["requested_at"] + 2.5
    assert status["lines_reset"] == {"em3": 12} and status["erased"] == {"history_keys": 1}


def test_a_request_the_broker_does_not_acknowledge_gets_503():
    runtime = _runtime(RecordingProducer(fail=True), InMemoryTombstones(), user_id_key=KEY)
    r = TestClient(create_app(runtime)).delete(f"/v1/users/{RAW}", headers={"X-API-Key": API})
    assert r.status_code == 503 and "retrying is safe" in r.json()["detail"]


def test_bad_ids_get_422_and_a_key_rotation_deletes_both_pseudonyms():
    producer, tombstones = RecordingProducer(), InMemoryTombstones()
    runtime = _runtime(producer, tombstones, user_id_key="new", user_id_key_previous="old")
    client = TestClient(create_app(runtime))
    assert client.delete("/v1/users/a%09b", headers={"X-API-Key": API}).status_code == 422
    assert client.delete(f"/v1/users/{RAW}", headers={"X-API-Key": API}).status_code == 202
    users = {codec.decode_deletion_record(v).user_id for _, _, v in producer.records}
    assert users == {Pseudonymizer("new")(RAW), Pseudonymizer("old")(RAW)}


def test_a_server_without_a_user_id_key_refuses_to_start_unless_raw_ids_are_allowed():
    with pytest.raises(ImproperlyConfigured, match="EM3_USER_ID_KEY"):
        _runtime(RecordingProducer(), InMemoryTombstones())
    runtime = _runtime(RecordingProducer(), InMemoryTombstones(), allow_raw_user_ids=True)
    assert runtime.pseudonymize(RAW) == RAW

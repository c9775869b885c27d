"""The demo's simulated world: its clock and the items the server is told about.

A demo run builds the starting catalogue while its services start, and the world
its users live in when the traffic starts; nothing that arrives in the world may
be left unregistered with the server (it would be a cold-start item with no content).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from em3.app.demo import DemoConfig, make_world, _PacedServer


class _FakeHTTP:
    """Records the items registered and answers every ranking with the candidates."""

    def __init__(self) -> None:
        self.registered: list[str] = []

    def register_items(self, contents) -> None:
        self.registered.extend(c.item_id for c in contents)

    def rank(self, user_id, candidates, context, k, explain=False):
        return SimpleNamespace(arm="em3", model_version=1, explanations=None, items=list(candidates)[:k])


def test_the_world_does_not_depend_on_its_start_time_but_for_the_shift():
    config = DemoConfig(seed=0)
    early, late = make_world(config, t0=1_000.0), make_world(config, t0=5_000.0)
    assert early.item_ids == late.item_ids
    np.testing.assert_allclose(np.asarray(early._arrival) - 1_000.0, np.asarray(late._arrival) - 5_000.0)
    assert len(early.catalog(1_000.0)) == len(late.catalog(5_000.0)) == config.n_items


def test_items_that_arrived_before_the_first_request_are_registered_with_it():
    config = DemoConfig(seed=0)
    world = make_world(config, t0=1_000.0)
    # The traffic starts 120 s after the world (a slow startup): items arrived meanwhile.
    traffic_t0 = 1_120.0
    before = world.arrivals_between(1_000.0, traffic_t0)
    assert len(before) > 0
    http = _FakeHTTP()
    paced = _PacedServer(http, world, traffic_t0, lambda line, version: None, lambda: None)
    request = world.next_request(traffic_t0 + 0.5)
    paced.rank(request.user_id, request.candidates, {**request.context, "t": str(request.t)}, 10)
    assert set(before) <= set(http.registered)
    assert paced.new_items == len(http.registered) == len(world.arrivals_between(1_000.0, request.t))


def _arms_of_the_users(seed: int, key: str) -> list[str]:
    from em3.app.demo import _experiment
    from em3.privacy import Pseudonymizer

    config = DemoConfig(seed=seed)
    experiment = _experiment(config)
    pseudonym = Pseudonymizer(key)
    world = make_world(config, t0=0.0)
    return [experiment.arm_for(pseudonym(user)).name for user in world.user_ids]


def test_a_demo_seed_fixes_which_users_land_in_which_arm():
    from em3.app.demo import demo_user_id_key
    from em3.app.services import LocalServices
    from em3.privacy import new_user_id_key

    key = demo_user_id_key(0)
    assert key == demo_user_id_key(0) != demo_user_id_key(1)
    split = _arms_of_the_users(0, key)
    assert split == _arms_of_the_users(0, demo_user_id_key(0))
    assert 0.3 < split.count("em3") / len(split) < 0.7
    # A random key (what the demo used to get) draws another split.
    assert split != _arms_of_the_users(0, new_user_id_key())
    assert LocalServices("/tmp/unused-services-dir", user_id_key=key).info.user_id_key == key
    assert LocalServices("/tmp/unused-services-dir").info.user_id_key not in ("", key)

"""Simulators: log replay, simulated users, the online A/B runner, off-policy estimators.

Pure cores (arrays and iterables in, numbers and events out) with I/O at the
edges: Kafka only in :mod:`simulators.kafka_sink` (through :mod:`stream.kafka`),
the report page (Jinja2, inline SVG) only in :mod:`simulators.report`. Both are
imported lazily, on first use of :func:`produce_events` or :func:`write_report`.

Modules
-------
ope          replay, IPS, SNIPS, DR estimators with confidence intervals
obd          Open Bandit Dataset sample reader, Bernoulli-TS action distribution
sequential   mSPRT (always-valid p-values, confidence sequences), z-test
replay       log replay core (event-time order, delays, pacing, resume)
replay_sources  OBD and JSONL/CSV/Parquet adapters
world        simulated users and items with hidden ground truth
rankers      the Ranker protocol and baseline rankers
ab           the online A/B runner and its JSON report
report       the HTML report page: verdict first, SVG plots, tables, raw JSON
"""
from __future__ import annotations

from typing import Any

from simulators.ab import ABConfig, ABReport, ABRunner, run_ab
from simulators.delays import ExponentialDelay, FixedDelay, LogNormalDelay
from simulators.obd import OBDLog, bts_action_dist, load_obd
from simulators.ope import OPEEstimate, estimate_dr, estimate_ips, estimate_replay, estimate_snips
from simulators.rankers import LearningRanker, OracleRanker, PopularityRanker, RandomRanker, Ranker, Ranking
from simulators.replay import LogReplayer, LogRow, Malformed, ReplayConfig, ReplayStats
from simulators.replay_sources import file_rows, obd_rows
from simulators.sequential import SequentialTest, msprt, z_test
from simulators.world import Feedback, Request, World, WorldConfig

__all__ = [
    "ABConfig", "ABReport", "ABRunner", "run_ab",
    "ExponentialDelay", "FixedDelay", "LogNormalDelay",
    "OBDLog", "bts_action_dist", "load_obd",
    "OPEEstimate", "estimate_dr", "estimate_ips", "estimate_replay", "estimate_snips",
    "LearningRanker", "OracleRanker", "PopularityRanker", "RandomRanker", "Ranker", "Ranking",
    "LogReplayer", "LogRow", "Malformed", "ReplayConfig", "ReplayStats",
    "file_rows", "obd_rows",
    "SequentialTest", "msprt", "z_test",
    "Feedback", "Request", "World", "WorldConfig",
    "produce_events", "write_report",
]


def __getattr__(name: str) -> Any:
    if name == "produce_events":
        from simulators.kafka_sink import produce_events

        return produce_events
    if name == "write_report":
        from simulators.report import write_report

        return write_report
    raise AttributeError(f"module 'simulators' has no attribute {name!r}")

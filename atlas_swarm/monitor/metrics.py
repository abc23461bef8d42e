"""Prometheus text exposition of a monitor snapshot: atlas_* metrics, labelled per run and per peer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _SnapshotCollector:
    def __init__(self, snapshot: dict, healthy: bool):
        self.snapshot, self.healthy = snapshot, healthy

    def collect(self):
        s = self.snapshot
        up = GaugeMetricFamily("atlas_monitor_up", "1 if the monitor's DHT node is healthy")
        up.add_metric([], 1.0 if self.healthy else 0.0)
        yield up
        polls = CounterMetricFamily("atlas_monitor_polls", "DHT polls by result", labels=["result"])
        for result, n in s["polls"].items():
            polls.add_metric([result], n)
        yield polls
        rejected = CounterMetricFamily("atlas_dht_records_rejected", "DHT records dropped: bad signature, schema "
                                       "violation, or forged content (signed by one peer, naming another)",
                                       labels=["reason"])  # fmt: skip
        for reason in ("signature", "schema", "forged", "not_admitted"):
            rejected.add_metric([reason], s["rejected"].get(reason, 0))
        yield rejected
        runs = GaugeMetricFamily("atlas_runs", "runs seen in the DHT")
        runs.add_metric([], len(s["runs"]))
        yield runs

        run_gauges = {
            "peers": ("atlas_run_peers", "peers online in the run"),
            "epoch": ("atlas_run_epoch", "the swarm's epoch"),
            "samples": ("atlas_run_samples", "samples accumulated toward the target in this epoch"),
            "target": ("atlas_run_target_samples", "samples per epoch (the spec's target batch size)"),
            "loss": ("atlas_run_loss", "mean of the peers' recent training loss"),
            "samples_per_second": ("atlas_run_samples_per_second", "sum of the peers' throughput"),
        }
        families = {k: GaugeMetricFamily(n, h, labels=["run"]) for k, (n, h) in run_gauges.items()}
        peer_gauges = {
            "epoch": ("atlas_peer_epoch", "the peer's epoch"),
            "samples_total": ("atlas_peer_samples", "samples the peer trained on in this run"),
            "samples_per_second": ("atlas_peer_samples_per_second", "the peer's throughput"),
            "loss": ("atlas_peer_loss", "the peer's recent training loss"),
            "rewards_eth": ("atlas_peer_rewards_eth", "rewards earned on chain (claimable + pending)"),
        }
        labels = ["run", "peer", "device", "client_mode"]
        pfam = {k: GaugeMetricFamily(n, h, labels=labels) for k, (n, h) in peer_gauges.items()}
        rounds = CounterMetricFamily("atlas_peer_averaging_rounds", "epochs ended by an all-reduce with others "
                                     "(averaged) or on local gradients while others were there (failed)",
                                     labels=labels + ["result"])  # fmt: skip
        receipts = GaugeMetricFamily("atlas_peer_receipts", "co-signed receipts by state (posted: settled on chain)",
                                     labels=labels + ["state"])  # fmt: skip
        refused = CounterMetricFamily("atlas_peer_refused", "requests and records the peer refused or ignored: "
                                      "non-admitted peers, bad updates, unverified states", labels=labels)  # fmt: skip
        outliers = CounterMetricFamily("atlas_peer_outliers", "groupmates' updates the peer's robust aggregation "
                                       "clipped or trimmed hard", labels=labels)  # fmt: skip
        for run in s["runs"]:
            values = dict(run, peers=len(run["peers"]))
            for key, fam in families.items():
                if values.get(key) is not None:
                    fam.add_metric([run["run_id"]], float(values[key]))
            for p in run["peers"]:
                lv = [run["run_id"], p["peer_id"], p["device"], str(p["client_mode"]).lower()]
                for key, fam in pfam.items():
                    if p.get(key) is not None:
                        fam.add_metric(lv, float(p[key]))
                rounds.add_metric(lv + ["averaged"], p["rounds_averaged"])
                rounds.add_metric(lv + ["failed"], p["rounds_failed"])
                receipts.add_metric(lv + ["posted"], p["receipts_posted"])
                receipts.add_metric(lv + ["pending"], p["receipts_pending"])
                refused.add_metric(lv, p.get("refused", 0))
                outliers.add_metric(lv, p.get("outliers", 0))
        yield from families.values()
        yield from pfam.values()
        yield rounds
        yield receipts
        yield refused
        yield outliers


def render(snapshot: dict, healthy: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, healthy))
    return generate_latest(registry)

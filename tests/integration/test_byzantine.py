"""Byzantine peers against honest CLI peers: each test starts honest `python -m atlas_swarm.peer` processes and one
attacker (our own peer with one attack patched in, tests/byzantine.py: its own key, the run id and the first peer's
multiaddr) that does one thing. Each passes only if the honest peers finish, hold equal adapters, and the
attack shows in what they report. On the code before the Byzantine-averaging work each of these fails (README,
"Threat model"), for the reason its first assertion names."""

from __future__ import annotations

import json

import pytest
import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.identity import Identity
from tests.conftest import write_spec
from tests.integration.test_swarm import adapter, eval_loss, max_abs_diff
from tests.peers import first_maddr, killed_at_exit, planned_first, start_peer

pytestmark = pytest.mark.integration
EPOCHS = ["--max-epochs", "6"]
SHORT = ["--max-epochs", "3"]  # what a test of joining needs


# attacks on progress records start once the honest peers have started: what they do depends on who is there first
# (an attacker that is: test_a_progress_liar_that_came_first…); any other starts with them (7 s less a test)
JOINS_LAST = ("fake_progress", "inflate_progress", "one_epoch_ahead")


def start_honest_and_attacker(peers, tmp_path, spec, data, attack, honest=2, extra=()):
    """``honest`` honest peers and one attacker (it knows what anyone would: the run id and the first peer's address,
    planned), all with batch 4, started at once, or the attacker once the others have started (JOINS_LAST); returns
    the first's started event."""
    listen, address = planned_first(tmp_path, "honest0")
    first = start_peer(tmp_path, "honest0", [*listen, "--run-spec", str(spec), "--data", str(data), "--batch-size",
                                             "4", *EPOCHS, "--wait-for-peers", str(honest + 1), "--join-timeout", "90",
                                             *extra])  # fmt: skip
    peers.append(first)
    join = ["--initial-peers", address, "--run", RunSpec.from_toml(spec).run_id, "--data", str(data),
            "--batch-size", "4", *EPOCHS, "--join-timeout", "90", "--wait-for-peers", str(honest + 1)]  # fmt: skip
    for i in range(1, honest):
        peers.append(start_peer(tmp_path, f"honest{i}", [*join, "--seed", str(i), *extra]))
    last = any(a in attack.split(",") for a in JOINS_LAST)
    for p in peers[peers.index(first):] if last else ():
        p.wait_event("started", 90)
    # (one that fakes its progress believes itself behind and tries to sync: 10 s, not 90; it joins a swarm already up)
    timeout = "10" if last else "90"
    peers.append(start_peer(tmp_path, "attacker", [*join, "--seed", "9", *extra, "--join-timeout", timeout],
                            attack=attack))  # fmt: skip
    return first.wait_event("started", 90)


def finish_honest(peers, honest=2):
    codes = [p.wait_exit(300) for p in peers[:honest]]
    peers[honest].kill()  # the attacker may linger in the final agreement; it is not under test
    assert codes == [0] * honest, "\n\n".join(p.tail() for p in peers)
    return [adapter(p) for p in peers[:honest]]


def assert_honest_agree_and_are_sane(adapters, peers=()):
    for a in adapters:
        assert all(bool(torch.isfinite(t).all()) for t in a.values()), "an honest adapter holds NaN or inf"
        assert max(t.abs().max().item() for t in a.values()) < 10, "an honest adapter was blown up"
    why = [(p.name, p.events("synced"), p.events("final")) for p in peers]  # who agreed with whom, and when
    for other in adapters[1:]:
        assert max_abs_diff(adapters[0], other) == 0.0, f"honest peers do not hold bit-identical adapters: {why}"


def attacker_id(peers) -> str:
    return peers[-1].wait_event("started", 90)["peer_id"]


def attacked_run(tmp_path, model, data, attack):
    """Two honest peers and an attacker train 6 epochs; returns the spec, the peers (the attacker last) and the
    attacker's PeerID once the honest peers have exited 0 holding bit-identical, finite, sane adapters."""
    # 480 samples: on an idle machine the tiny model trains ~200 samples/s per peer, and with 96 each peer ended its
    # first epochs alone (before its tracker saw the others), the honest states split, and no round ever formed
    # (2 of 3 loop runs: "no honest peer met the attacker", "the loss did not fall"). 1920: on 2026-12-03 the VM
    # trained ~750 samples/s per peer, epochs of 480 took under a second, shorter than matchmaking_time (2 s), and a
    # full suite's NaN test met the attacker in no round at all (README, Known limits)
    spec = write_spec(tmp_path / "spec.toml", str(model), target_batch_size=1920)
    with killed_at_exit([]) as peers:
        start_honest_and_attacker(peers, tmp_path, spec, data, attack)
        bad = attacker_id(peers)
        assert_honest_agree_and_are_sane(finish_honest(peers), peers[:2])
    return spec, peers, bad


def test_a_nan_gradient_is_dropped_and_counted(tmp_path, tiny_model, text_data):
    _, peers, bad = attacked_run(tmp_path, tiny_model, text_data, "nan_gradient")
    # the attack shows: the attacker's update never entered an honest round; an honest peer that met it dropped it,
    # says why, and counted it (which honest peers matchmaking put with the attacker is chance)
    met = 0
    for p in peers[:2]:
        assert not [e for e in p.events("epoch") if bad in e["group"]], "a NaN update was aggregated"
        dropped = [e["dropped"][bad] for e in p.events("epoch") if bad in e.get("dropped", {})]
        assert all("non-finite" in why for why in dropped), dropped
        assert p.wait_event("stopped", 1)["refused"] >= len(dropped)
        met += len(dropped)
    assert met, "no honest peer met the attacker: " + "\n\n".join(p.tail() for p in peers)


def test_a_sign_flipped_x1e6_gradient_with_a_lying_weight_is_clipped(tmp_path, tiny_model, text_data):
    spec, peers, bad = attacked_run(tmp_path, tiny_model, text_data, "flip_x1e6_gradient,lying_weight")
    before, after = eval_loss(spec, text_data, None), eval_loss(spec, text_data, peers[0].out / "adapter")
    assert after < before, f"the honest peers' loss did not fall: {before} -> {after}"
    # every round the attacker was in had a majority (it never averaged alone with an honest peer while the other
    # was near its epoch: gather.PAIR_REFUSED), and in it the attacker was flagged and weighed no more than the
    # median. (In 1 of 7 runs it was in none: it kept downloading state; then only the promises above are checked.)
    for p in peers[:2]:
        rounds = [e for e in p.events("epoch") if bad in e["group"]]
        assert all(len(e["group"]) >= 3 for e in rounds), "the attacker averaged as a pair with an honest peer"
        assert all(bad in e["outliers"] for e in rounds), [e["outliers"] for e in rounds]
        assert all(e["weights"][bad] <= max(w for q, w in e["weights"].items() if q != bad) for e in rounds)


def test_a_poisoned_state_is_not_downloaded_by_a_late_joiner(tmp_path, tiny_model, text_data):
    # the attacker declares the highest donor priority and serves parameters of 100.0 or Adam statistics of the wrong
    # shape (poison_state); a newcomer joins later
    # (epochs of 2-3 s: the swarm must outlive the newcomer's start and leave it time to find a state the majority
    # holds: after a round some missed, honest states differ until the next state round, and a download waits for
    # one. Launched at epoch 2, the newcomer began its download at epochs 8-15 in 5 local runs (20-30 s of start-up
    # beside three training peers on 2 cores) and once took it at epoch 18 (a sync of 11 s); with 16 epochs, CI's
    # slower machine once had it arrive after the others had left: it finished alone, on its own adapter)
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=960)
    with killed_at_exit([]) as peers:
        started = start_honest_and_attacker(peers, tmp_path, spec, text_data, "poison_state",
                                            extra=["--max-epochs", "26"])  # fmt: skip
        peers[0].wait_event("epoch", 120, lambda e: e["epoch"] >= 2)
        late = start_peer(tmp_path, "late", ["--initial-peers", first_maddr(started), "--run", started["run_id"],
                                              "--data", str(text_data), "--batch-size", "4", "--max-epochs", "26",
                                              "--join-timeout", "90"])  # fmt: skip
        peers.insert(2, late)
        synced = late.wait_event("synced", 120)
        adapters = finish_honest(peers, honest=3)
        assert_honest_agree_and_are_sane(adapters, peers[:3])
        # the newcomer took a state the honest majority holds (its download asks the three others for a stripe each
        # first, so the attacker's part is always in it; one donor at a time after, the attacker's priority is capped
        # at the expected epoch, so which donor it asks first is chance; test_averagers checks each refusal)
        hashes = {p.name: [e["adapter_hash"][:6] for e in p.events("epoch")] for p in peers[:2]}  # who missed rounds
        assert synced["epoch"] >= 2 and synced["verified"], (synced, hashes)
        # the attacker serves by turns poisoned parameters and honest ones with Adam statistics of the wrong shape:
        # whichever the newcomer got was refused (synced's refused_states says whether it asked the attacker); on
        # the code before the statistics check, the second made the newcomer's next optimizer step fail
        assert "Traceback" not in late.err_path.read_text(), late.tail()


def test_progress_a_million_epochs_ahead_is_not_followed(tmp_path, tiny_model, text_data):
    _, peers, _ = attacked_run(tmp_path, tiny_model, text_data, "fake_progress")
    for p in peers[:2]:  # the honest pair kept averaging together, and never went to fetch the "newer" state
        epochs = p.events("epoch")
        together = [e for e in epochs if len(e["group"]) >= 2]
        # (the first epochs can end before the pair's first group forms: a peer that starts late steps through
        # them on its partner's samples, 4 samples each, seen once in 3 runs)
        assert len(together) >= len(epochs) - 2, [e["group"] for e in epochs]
        assert not p.events("syncing"), "an honest peer followed the fake epoch"


def test_a_samples_liar_at_its_own_epoch_does_not_end_every_epoch(tmp_path, tiny_model, text_data):
    spec, peers, _ = attacked_run(tmp_path, tiny_model, text_data, "inflate_progress")
    target = RunSpec.from_toml(spec).averaging.target_batch_size
    # The liar's records count as at most twice the median rate since the epoch began, and are dated no earlier than
    # those samples allow (admission.sane_progress), so the two honest peers still do a bounded share of each epoch:
    # half at equal speeds, less the seconds of averaging in which the liar's allowance grows and nobody trains (means
    # of 568-871 of 1920 samples per epoch in 6 runs, 2026-12-06; target / 4 asserted). In CI the liar, starting last,
    # once ended its first epoch alone at once and was one epoch ahead: the pair's first two epochs ended on reading
    # it ([140, 8, 729, 772, 801, 309], mean 460); such a record is held now (admission.hold_lone_leaders). With its
    # records also dated 10^4 s back, the rate and sample caps alone gave means of 122-437 in 5 runs (one: [2, 2, 2,
    # 2, 601]); with those caps removed as well, the first record read ended each epoch: medians of 2 samples.
    # (Those means are per epoch both honest peers recorded. Asserted now: per epoch of the run, the pair's samples in
    # all: a peer that fell behind syncs over epochs, leaving 3 in common, in 1 of 5 runs with the hold and 1 of 5
    # without. Per run: 529-1491 in 15 runs with the hold, 500-1558 in 5 without, 2026-12-06.) Then in CI 458:
    # [{3: 1, 4: 224}, {1: 4, 2: 4, 3: 4, ...}]. The liar, waiting least, stores its record first, and a reader that
    # had read neither its own record nor the other's made the liar its own median: an honest peer's first epoch ended
    # under target / 8 (mostly after one batch) in 14 of 18 runs of that code. A peer known only by its status (the
    # reader too, before its first record) now counts in the caps as one that has done nothing: per run 830-1612 in 11
    # runs, first epochs 765-1420 (the code before: 451-1123 in 5 runs, one under target / 4)
    done = sum(p.wait_event("stopped", 1)["samples_total"] for p in peers[:2])
    epochs = max(e["epoch"] for p in peers[:2] for e in p.events("epoch"))
    per_peer = [{e["epoch"]: e["samples"] for e in p.events("epoch")} for p in peers[:2]]
    assert epochs >= 6 and done / epochs >= target / 4, (target, done, epochs, per_peer)
    assert all(p[1] >= target / 8 for p in per_peer if 1 in p), ("a first epoch ended early", per_peer)


def test_a_progress_liar_that_came_first_does_not_hold_newcomers_in_sync(tmp_path, tiny_model, text_data):
    # Prepare: the liar starts the run; two honest peers join it at once, each seeing only the liar's progress (10^6
    # epochs ahead) while it loads. Before honest peers published a status ahead of their sync, each followed the
    # liar (the only other writer) and synced until --join-timeout (90 s), finding no state to take
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=1920)
    with killed_at_exit([]) as peers:
        listen, address = planned_first(tmp_path, "attacker")
        liar = start_peer(tmp_path, "attacker", [*listen, "--run-spec", str(spec), "--data", str(text_data),
                                                 "--batch-size", "4", *SHORT, "--join-timeout", "10"],
                          attack="fake_progress")  # fmt: skip
        liar.wait_event("syncing", 90)  # its progress record is out (it believes itself behind, 10 s)
        join = ["--initial-peers", address, "--run", RunSpec.from_toml(spec).run_id, "--data", str(text_data),
                "--batch-size", "4", *SHORT, "--join-timeout", "90", "--wait-for-peers", "3"]  # fmt: skip
        peers.extend(start_peer(tmp_path, f"honest{i}", [*join, "--seed", str(i)]) for i in range(2))
        peers.append(liar)
        # Execute
        started = [p.wait_event("started", 120) for p in peers[:2]]
        adapters = finish_honest(peers)
    # Assert: neither waited out --join-timeout (each saw the other's status and stopped following the liar), neither
    # took the liar's epoch, and they trained together
    for p, s in zip(peers[:2], started):
        assert s["startup_s"].get("sync", 0.0) < 20.0, s["startup_s"]
        assert all(e["epoch"] < 10 for e in p.events("synced")), p.events("synced")
        assert [e for e in p.events("epoch") if len(e["group"]) >= 2], "the honest peers never averaged together"
    assert_honest_agree_and_are_sane(adapters, peers[:2])


def test_a_private_run_refuses_strangers(tmp_path, tiny_model, text_data):
    # Prepare: an allowlist run of two listed peers (their keys made beforehand), mean aggregation (the allowlist
    # default: listed peers are trusted, so one stranger's update in a round would move the mean anywhere)
    ids = [Identity.load_or_create(tmp_path / f"listed{i}.key") for i in range(2)]
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=480,
                      trust={"admission": "allowlist", "allowlist": [i.peer_id for i in ids]})  # fmt: skip
    with killed_at_exit([]) as peers:
        first = start_peer(tmp_path, "honest0", ["--run-spec", str(spec), "--data", str(text_data), "--batch-size",
                                                 "4", *EPOCHS, "--wait-for-peers", "2", "--join-timeout", "90",
                                                 "--identity", str(ids[0].path)])  # fmt: skip
        peers.append(first)
        started = first.wait_event("started", 90)
        join = ["--initial-peers", first_maddr(started), "--run", started["run_id"], "--data", str(text_data),
                "--batch-size", "4", *EPOCHS, "--join-timeout", "90"]  # fmt: skip
        # Execute: an honest stranger, one that skips its own check and sends a poisoned gradient, and a thief that
        # skips its check and downloads the listed peers' state as soon as they claim a trained one, all in the swarm
        # before the second listed peer (training starts with it): with the attacker started last, the listed peers
        # once finished their 6 short epochs before reading any of its records (once in a full suite: refused 0)
        stranger = start_peer(tmp_path, "stranger", join)
        peers.append(start_peer(tmp_path, "attacker", [*join, "--seed", "9"],
                                attack="skip_admission,flip_x1e6_gradient,lying_weight"))  # fmt: skip
        thief = start_peer(tmp_path, "thief", [*join, "--seed", "8"], attack="skip_admission,steal_state")
        peers.append(thief)  # (killed at the end)
        peers[-2].wait_event("started", 90)
        thief.wait_event("started", 90)
        # (--wait-for-peers 2 too, and epochs of 480 samples: with 96 and without the wait, the second listed peer,
        # the first's status not yet read, trained its 6 epochs alone in 1.5 s, before the thief saw a trained state
        # claimed: 1 of 3 runs of a922bb9's test, 2026-12-07; with the wait alone, the pair's 6 epochs took 6 s and
        # the thief again saw none claimed, 1 of 5 runs)
        peers.insert(1, start_peer(tmp_path, "honest1", [*join, "--identity", str(ids[1].path), "--seed", "1",
                                                         "--wait-for-peers", "2"]))  # fmt: skip
        # Assert: the honest stranger is told why, and exits 2
        assert stranger.wait_exit(120) == 2, stranger.tail()
        assert "not in its allowlist" in stranger.wait_event("error", 1)["error"]
        bad = peers[2].wait_event("started", 1)["peer_id"]  # the attacker (the thief is last)
        adapters = finish_honest(peers)
        assert_honest_agree_and_are_sane(adapters)
        for p in peers[:2]:
            assert all(bad not in e["group"] for e in p.events("epoch")), "the stranger averaged with a listed peer"
            assert p.wait_event("stopped", 1)["refused"] >= 1  # its join requests, records, progress: counted
        # the thief's downloads of the listed peers' trained state came back empty (without the check, it got that
        # state in each of its 3 tries), and the listed peers counted them
        tries = [json.loads(line) for line in (thief.out / "stolen.jsonl").read_text().splitlines()]
        assert tries, "the thief never saw a trained state claimed"
        assert not any(t["got"] for t in tries), tries
        assert sum(p.wait_event("stopped", 1)["refusals"].get("refused_downloads", 0) for p in peers[:2]) >= 1



def test_a_liar_one_epoch_ahead_ends_no_epoch_and_the_honest_pair_keeps_averaging(tmp_path, tiny_model, text_data):
    # The liar trains in step and publishes its epoch + 1 (one_epoch_ahead). Before admission.hold_lone_leaders each
    # honest peer ended its epoch as soon as it read that record, alone, and jumped two epochs at a time: in 1 run the
    # pair recorded 3 of 6 epochs, [220, 692, 696] samples of 1920, none in a group. Held, its record counts nothing:
    # the pair did means of 1941-2334 per epoch in 5 runs, every epoch in a group of 3 (without an attacker, three
    # honest peers did 1930-2000 together: an epoch's end is estimated, and single epochs ranged 963-2584)
    spec, peers, _ = attacked_run(tmp_path, tiny_model, text_data, "one_epoch_ahead")
    target = RunSpec.from_toml(spec).averaging.target_batch_size
    epochs = [{e["epoch"]: e for e in p.events("epoch")} for p in peers[:2]]
    both = sorted(set(epochs[0]) & set(epochs[1]))
    honest = [epochs[0][e]["samples"] + epochs[1][e]["samples"] for e in both]
    assert len(both) >= 5 and sum(honest) / len(honest) >= target * 3 / 4, (target, honest)
    pair = {p.wait_event("started", 1)["peer_id"] for p in peers[:2]}
    paired = [e for e in both if pair <= set(epochs[0][e]["group"])]
    # In one full-suite run (2026-12-06) the three began out of step (one honest peer's tracker saw only its own
    # record for its first 4 s, so it fetched late and synced into epoch 1) and no round formed until epoch 4; from
    # there on every epoch had all three. Asserted: at least half the epochs paired, and every one after the first
    # paired epoch but one (the attack on the old code: none paired)
    after = [e for e in both if paired and e >= paired[0]]
    assert 2 * len(paired) >= len(both) and len(paired) >= len(after) - 1, [epochs[0][e]["group"] for e in both]
    # Nor did it move an honest peer at the start: a tracker that read the liar's record (its wait for company over
    # first) before the statuses of the peers waited for were noted followed it as a majority of one, and that peer
    # began in epoch 1, alone (5 of 8 runs with 0.5-s fetches while a status's record is unread, before the wait
    # noted each status read; README, Known limits)
    assert [p.events("progress")[0]["epoch"] for p in peers[:2]] == [0, 0]

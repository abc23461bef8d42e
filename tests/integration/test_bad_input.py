"""Every user mistake gets a one-paragraph error and exit code 2, never a traceback. The "other peer" in these tests is
a real DHT node in this process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from atlas_swarm.config import RunSpec
from atlas_swarm.identity import Identity
from atlas_swarm.peer import main
from atlas_swarm.swarm import PeerStatus, Swarm
from tests.conftest import write_spec

pytestmark = pytest.mark.integration


def run_peer(capsys, *args) -> tuple[int, dict]:
    code = main(["--log-format", "json", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *args])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    errors = [e for e in events if e["event"] == "error"]
    return code, (errors[0] if errors else {})


@pytest.fixture
def other_peer(tmp_path, tiny_spec):
    """A live swarm of one peer that publishes ``tiny_spec``."""
    swarm = Swarm.join(Identity.load_or_create(tmp_path / "other.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        spec = RunSpec.from_toml(tiny_spec)
        swarm.publish_spec(spec)
        yield swarm, spec
    finally:
        swarm.shutdown()


def test_unreachable_initial_peers(capsys, tmp_path, text_data):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmVSvfcGh76o4bQtUnKLYSmJuf7J5LkmYxkhkfskTzVYyG"
    code, err = run_peer(capsys, "--initial-peers", dead, "--run", "tiny-test-0123456789abcdef",
                         "--data", str(text_data), "--out", str(tmp_path / "p"), "--join-timeout", "4")  # fmt: skip
    assert code == 2
    assert err["kind"] == "PeersUnreachable" and "None of --initial-peers answered" in err["error"]
    assert "in 4 s, --join-timeout" in err["error"]


def test_a_first_peer_that_comes_up_after_the_joiner_started_is_still_found(tmp_path):
    # Prepare: the first peer's address is known (its identity and port) before it runs
    first_id = Identity.load_or_create(tmp_path / "first.key")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{first_id.peer_id}"
    first, joiner = [], None
    starter = threading.Timer(1.0, lambda: first.append(Swarm.join(first_id, host_maddrs=[address.split("/p2p/")[0]])))
    try:
        # Execute: the joiner starts while nobody listens there (p2pd's one round of dials fails)
        starter.start()
        joiner = Swarm.join(Identity.load_or_create(tmp_path / "joiner.key"), [address],
                            host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=30)  # fmt: skip
        # Assert
        starter.join(30)
        assert first and first[0].peer_id in {str(p) for p in joiner.dht.run_coroutine(_connected)}
    finally:
        starter.cancel()
        starter.join(30)
        for swarm in [joiner, *first]:
            if swarm is not None:
                swarm.shutdown()


async def _connected(dht, node):
    return [info.peer_id for info in await node.p2p.list_peers()]


def test_malformed_multiaddr(capsys, tmp_path, text_data):
    code, err = run_peer(capsys, "--initial-peers", "/ip4/not-an-ip/tcp/1", "--run", "tiny-test-0123456789abcdef",
                         "--data", str(text_data), "--out", str(tmp_path / "p"))  # fmt: skip
    assert code == 2 and "is not a multiaddr" in err["error"]


def test_unknown_run_id(capsys, tmp_path, text_data, other_peer):
    swarm, _ = other_peer
    code, err = run_peer(capsys, "--initial-peers", swarm.visible_maddrs()[0], "--run", "nope-0123456789abcdef",
                         "--data", str(text_data), "--out", str(tmp_path / "p"), "--join-timeout", "3")  # fmt: skip
    assert code == 2 and err["kind"] == "RunNotFound" and "nope-0123456789abcdef" in err["error"]


def test_spec_mismatch_names_the_field(capsys, tmp_path, tiny_model, text_data, other_peer):
    swarm, spec = other_peer
    mine = write_spec(tmp_path / "mine.toml", str(tiny_model))
    mine.write_text(mine.read_text().replace("lr = 0.01", "lr = 0.02"))
    code, err = run_peer(capsys, "--initial-peers", swarm.visible_maddrs()[0], "--run", spec.run_id,
                         "--run-spec", str(mine), "--data", str(text_data), "--out", str(tmp_path / "p"))  # fmt: skip
    assert code == 2 and err["kind"] == "SpecMismatch"
    assert "optimizer.lr" in err["error"] and "0.02" in err["error"] and "0.01" in err["error"]


def test_incompatible_adapter_shape(capsys, tmp_path, text_data, other_peer):
    swarm, spec = other_peer
    swarm.publish_status(spec.run_id, PeerStatus(
        peer_id=swarm.peer_id, device="cpu", precision="fp32", client_mode=False, adapter_shapes="0000000000000000",
        epoch=0, samples_total=0, samples_per_second=0.0, loss=None, time=0.0))  # fmt: skip
    code, err = run_peer(capsys, "--initial-peers", swarm.visible_maddrs()[0], "--run", spec.run_id,
                         "--data", str(text_data), "--out", str(tmp_path / "p"))  # fmt: skip
    assert code == 2 and err["kind"] == "ModelError" and "adapter's tensor shapes" in err["error"]


def test_missing_model_path(capsys, tmp_path, text_data):
    spec = write_spec(tmp_path / "spec.toml", "/nonexistent/model")
    code, err = run_peer(capsys, "--run-spec", str(spec), "--data", str(text_data), "--out", str(tmp_path / "p"))
    assert code == 2 and err["kind"] == "ModelError" and "/nonexistent/model" in err["error"]


def test_data_with_wrong_columns(capsys, tmp_path, tiny_spec):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello"}\n')
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(data), "--out", str(tmp_path / "p"))
    assert code == 2 and err["kind"] == "DataError" and "'text'" in err["error"] and "d.jsonl:1" in err["error"]


def test_malformed_spec(capsys, tmp_path, text_data):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\n[model]\nbase = "m"\ntask = "translation"\n[lora]\ntarget_modules = ["q"]\n')
    code, err = run_peer(capsys, "--run-spec", str(spec), "--data", str(text_data), "--out", str(tmp_path / "p"))
    assert code == 2 and "model.task" in err["error"] and "causal-lm" in err["error"]


def test_corrupted_checkpoint(capsys, tmp_path, tiny_spec, text_data):
    out = tmp_path / "p"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(out))
    assert code == 2 and err["kind"] == "CheckpointError" and "corrupted" in err["error"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"\x00garbage"  # nothing lost


def test_cli_prints_a_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atlas_swarm.peer", "--run", "bad id"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "is not a run id" in proc.stdout


# -- chain flags: each mistake is named before any training starts -------------------------------------------------
def test_chain_flags_must_come_together(capsys, tmp_path, tiny_spec, text_data):
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(tmp_path / "p"),
                         "--chain-rpc", "http://127.0.0.1:9")  # fmt: skip
    assert code == 2 and "--staking-contract, --wallet" in err["error"]


@pytest.fixture
def anvil_contract(tmp_path):
    from eth_account import Account

    from atlas_swarm.chain import StakingClient
    from atlas_swarm.chain.wallet import create_wallet
    from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil

    anvil = Anvil.start()
    try:
        client = StakingClient.deploy(StakingClient.web3(anvil.url), Account.from_key(DEV_KEYS[0]))
        create_wallet(str(tmp_path / "w.json"), "right", bytes.fromhex(DEV_KEYS[1][2:]), kdf="pbkdf2")
        (tmp_path / "pw").write_text("right")
        (tmp_path / "bad-pw").write_text("wrong")
        yield anvil.url, client
    finally:
        anvil.stop()


@pytest.mark.parametrize("case, expected", [
    ("unreachable", "did not answer"),
    ("wrong-password", "Wrong password"),
    ("not-the-contract", "not AtlasStaking"),
    ("no-trainer", "names no trainer"),
    ("run-not-on-chain", "is not on the staking contract"),
])  # fmt: skip
def test_chain_misconfiguration_is_a_clear_error(capsys, tmp_path, tiny_model, text_data, anvil_contract, case,
                                                 expected):  # fmt: skip
    from eth_account import Account

    from atlas_swarm.devnet.anvil import DEV_KEYS

    url, client = anvil_contract
    trainer = "" if case == "no-trainer" else Account.from_key(DEV_KEYS[0]).address
    tiny_spec = write_spec(tmp_path / "spec.toml", str(tiny_model), trainer=trainer)
    rpc = "http://127.0.0.1:9" if case == "unreachable" else url
    contract = "0x" + "12" * 20 if case == "not-the-contract" else client.address
    pw = tmp_path / ("bad-pw" if case == "wrong-password" else "pw")
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(tmp_path / "p"),
                         "--chain-rpc", rpc, "--staking-contract", contract, "--wallet", str(tmp_path / "w.json"),
                         "--wallet-password-file", str(pw))  # fmt: skip
    assert code == 2 and expected in err["error"], err


@pytest.mark.parametrize("flags, kind, message", [
    (["--publish-every", "-1"], "ConfigError", "--publish-every -1 must be >= 0"),
    (["--ipfs-api", "127.0.0.1:5001"], "ConfigError", "is not a daemon URL"),
    (["--ipfs-api", "http://127.0.0.1:9"], "StorageError", "does not answer"),
])  # fmt: skip
def test_bad_storage_flags(capsys, tmp_path, tiny_spec, text_data, flags, kind, message):
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(tmp_path / "p"),
                         *flags)  # fmt: skip
    assert code == 2 and err["kind"] == kind and message in err["error"], err


# -- fitting a GPU: each impossible request is named before the peer joins ------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "nf4"], "--quantize nf4 needs a CUDA GPU (bitsandbytes); this peer would train on cpu"),
        (["--device", "cpu", "--quantize", "int8"], "--quantize int8 needs a CUDA GPU"),
        (["--max-memory", "6"], "--max-memory caps GPU memory; this peer trains on cpu"),
        (["--quantize", "nf3"], "--quantize 'nf3' is unknown"),
        (["--gradient-checkpointing", "yes"], "--gradient-checkpointing 'yes' is unknown"),
    ],
)
def test_gpu_only_flags_on_a_cpu_machine_are_clear_errors(capsys, tmp_path, tiny_spec, text_data, flags, message):
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(tmp_path / "p"),
                         *flags)  # fmt: skip
    assert code == 2 and err["kind"] == "ConfigError" and message in err["error"], err
    assert not (tmp_path / "p" / "identity.key").exists()  # refused before joining anything


def test_the_removed_auto_relay_flag_says_why_and_what_to_use(capsys, tmp_path, tiny_spec, text_data):
    code, err = run_peer(capsys, "--run-spec", str(tiny_spec), "--data", str(text_data), "--out", str(tmp_path / "p"),
                         "--auto-relay")  # fmt: skip
    assert code == 2 and err["kind"] == "ConfigError" and "use --client-mode" in err["error"], err

"""The only package that imports hivemind: join a swarm, publish/read run records, serve blocks, train together.

    node.Swarm              a DHT node with our identity; signed, schema-checked run records; plain methods only
    optimizer.SwarmOptimizer  hivemind.Optimizer over the adapter, queuing an EpochDone per epoch transition
    averagers               the gradient and state averagers: admitted peers only, groups per epoch, verified state
    gather                  a round: all-gather of signed updates, each member aggregating them (train/aggregate.py)
    stragglers              groupmates cut off for lateness: not waited for past the quorum in the next rounds
    gate                    the admitted set and refusal counts, shared with the averager processes
    schedule                when to look for a group, how long the last step is (pure functions, no hivemind)
    hold                    a leader holds its group open for the peers it follows (in the averager processes)
    consensus               finishing peers agree on one final adapter
    records                 the DHT record types (bounded pydantic schemas)
    blocks / audit / logs   block serving over p2p; rejected-record counts; hivemind's log lines
    tasks                   hivemind's processes keep their tasks until they end (none lost to the garbage collector)

Every hivemind 1.1.12 method we override, and why (tests/unit/test_hivemind_overrides.py checks that each still
exists on its hivemind base class with a signature ours accepts, and that none is missing from this list):
"""

import importlib

from atlas_swarm.swarm.logs import quiet_hivemind

# imported on first use (PEP 562): hivemind and torch take ~5 s to import, and `python -m atlas_swarm.chain` (through
# atlas_swarm.cli's quiet_hivemind) needs neither
_LAZY = {"Swarm": "node", "EpochDone": "optimizer", "SwarmOptimizer": "optimizer", "make_optimizer": "optimizer",
         "PeerStatus": "records"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# "module.Class.method": why (the base class is found in the class's MRO)
HIVEMIND_OVERRIDES = {
    # the optimizer (swarm/optimizer.py)
    "optimizer.SwarmOptimizer.__init__": "queue of EpochDone; run the optimizer step inline (InlineExecutor)",
    "optimizer.SwarmOptimizer._update_global_epoch": "record each transition (samples, group); look for next groups; "
    "the final epoch averages the state too; drop the fallback gradient",
    "optimizer.SwarmOptimizer.load_state_from_peers": "no verified state for schedule.unheld_state_wait: move to the "
    "majority's epoch with own parameters",
    "optimizer.SwarmOptimizer._average_gradients_and_load_into_optimizer": "give up a groupless round; note group",
    "optimizer.SwarmOptimizer._maybe_schedule_gradient_averaging": "look for groups at the transition, not mid-epoch",
    "optimizer.SwarmOptimizer._begin_averaging_gradients": "no round while alone; every round gathers its epoch",
    "optimizer.SwarmOptimizer._maybe_schedule_state_averaging": "same schedule for state rounds",
    "optimizer.SwarmOptimizer._make_state_averager": "our StateAverager",
    "optimizer.SwarmOptimizer._make_gradient_averager": "our GradAverager",
    "optimizer.SwarmOptimizer._make_progress_tracker": "our ThrottledTracker",
    "optimizer.SwarmOptimizer.shutdown": "a stopping peer cancels a round in flight instead of waiting it out",
    "tracker.ThrottledTracker.__init__": "the time of the last progress report",
    "tracker.ThrottledTracker.report_local_progress": "store progress at most every second (CPU of 2-core peers)",
    "tracker.ThrottledTracker.run": "end the loop's leftover tasks (a pending shutdown watcher printed \"Task was "
    "destroyed but it is pending!\" at exit)",
    # the averagers (swarm/averagers.py)
    "averagers.CancelOnShutdown._shutdown": "hivemind's crashes (AttributeError) when a round is in flight",
    "averagers.CancelsStateFirst.schedule_step": "the round's cancel() sets its cancelled state before telling the "
    "averager (cancel_round), hivemind's own calls included",
    "averagers.Admitted.rpc_join_group": "refuse join requests from non-admitted peers (counted)",
    "averagers.EpochGroups._step": "group keys carry the round's epoch (rounds of different epochs never meet); a "
    "leader holds its group open for the peers it follows (hold.py)",
    "averagers.EpochKeys.__init__": "knows the matchmaking whose round's epoch goes into the key",
    "averagers.EpochKeys.current_key": "prefix_epochN.0b... instead of prefix.0b...",
    "averagers.GradAverager.__init__": "one shared buffer for the averaged gradients; no state donor",
    "averagers.GradAverager.load_state_from_peers": "nothing: nobody serves a gradient averager's state",
    "averagers.GradAverager.load_accumulators_into_averager_": "keep the local mean gradient a round starts with: a "
    "failed round's fallback steps on it, not on the accumulators hivemind zeroed",
    "averagers.StateAverager.step": "skip a state round the swarm already had without us",
    "averagers.StateAverager._do": "give up a state round's search once the swarm has had that round (GivesUp)",
    "averagers.StateAverager._make_averaged_parameters": "parameters copied into one flat buffer",
    "averagers.StateAverager._declare_for_download_periodically": "store the donor record only when it changes",
    "averagers.StateAverager.__init__": "the gathering settings (admission gate, rule, signer) before the fork",
    "downloads.StateDownloads.load_state_from_peers": "tell the averager process which states it may accept",
    "downloads.StateDownloads._load_state_from_peers": "admitted donors, capped priority, striped, verified "
    "(epoch, digest), bounded as it streams",
    "downloads.StateDownloads.rpc_download_state": "our state for admitted askers only",
    "averagers.EpochKeys.get_averagers": "only admitted peers are found as leaders (counted)",
    "averagers.EpochKeys.declare_averager": "a search's withdrawal runs on its own, not under the matchmaking lock",
    # every process of hivemind's (swarm/tasks.py)
    "tasks.PinsTasks.run": "the DHT's and averagers' event loops keep each task until it ends (hivemind keeps no "
    "reference: a garbage collection destroyed calls waiting on p2pd, and their callers hung), and a call whose "
    "asker has exited is a ConnectionResetError, not an EOFError that ended the process (tasks.CallPipe)",
    # tensors on the wire (swarm/codec.py)
    "codec.Uniform8Bit.extract": "numpy 2 refuses hivemind's int() of a 1-element array (every 8-bit round failed)",
    "codec.Blockwise4Bit.compress": "our 4-bit codec (hivemind's stop at 8 bits): absmax blocks of 64, NF4 levels",
    "codec.Blockwise4Bit.extract": "its decoder: the exact length checked first, a tensor or ValueError",
    "codec.Blockwise4Bit.estimate_compression_ratio": "what hivemind's adaptive codecs would read (0.5625 / 4)",
    # the rounds (swarm/gather.py)
    "gather.GatherAverage._aggregate_with_group": "all-gather of signed updates + robust aggregate, not all-reduce",
    "gather.GatherAverage._step": "the round knows its StepControl (a refused pair is not retried); a round "
    "cancelled as it ends, or past its allreduce timeout, is not a traceback",
    "optimizer.SwarmOptimizer._tag_along_with_zero_weight": "a round still looking for its group is cancelled, not "
    "waited on for averaging_timeout: a peer out of sync has nobody left to find for it",
    "tracker.ThrottledTracker._parse_swarm_progress_data": "follow only admitted, sane progress records",
    # record validation (swarm/node.py, swarm/audit.py)
    "node.RunSchemaValidator.merge_with": "one schema copy per record type, not one per run (monitors)",
    "audit.AuditingValidator.merge_with": "validators added later join the audited set",
    "audit.AuditingValidator.validate": "count what each validator rejects, in hivemind's order",
    "audit.AuditingValidator.sign_value": "hivemind's CompositeValidator order",
    "audit.AuditingValidator.strip_value": "hivemind's CompositeValidator order",
    "audit.AuditingValidator.priority": "hivemind's CompositeValidator priority",
}

# hivemind internals we read or write without overriding a method: class -> attributes, or module functions it calls
# (swarm/tasks.py replaces switch_to_uvloop in its child processes); the test checks that the class's source still
# names each one
HIVEMIND_INTERNALS = {
    "hivemind.dht.schema.SchemaValidator": ("_schemas", "_key_id_to_field_name", "_allow_extra_keys"),  # merge, forget
    "hivemind.dht.validation.CompositeValidator": ("_validators",),  # forget a run's schema keys (node._drop_keys)
    "hivemind.dht.crypto.RSASignatureValidator": ("_PUBLIC_KEY_RE",),  # the signer's key in a record's subkey
    "hivemind.utils.crypto.RSAPrivateKey": ("__setstate__",),  # our identity's key in hivemind's key type
    "hivemind.averaging.averager.DecentralizedAverager": ("_matchmaking", "_running_groups", "_state_updated",
                                                          "switch_to_uvloop"),  # swarm/tasks.py
    "hivemind.dht.dht.DHT": ("switch_to_uvloop",),  # swarm/tasks.py: the loop of the DHT's process
    "hivemind.averaging.matchmaking.Matchmaking": ("step_control", "group_key_manager",  # the round's epoch
                                                   "potential_leaders"),  # hold.FetchingLeaders
    "hivemind.averaging.matchmaking.PotentialLeaders": ("max_assured_time",),  # hold.FetchingLeaders
    # a refused pair round is not retried; cancel_round sets the state before cancel()'s message to the averager
    "hivemind.averaging.control.StepControl": ("_allow_retries", "_cancel"),
    "hivemind.averaging.allreduce.AllReduceRunner": ("tensor_part_container", "banned_senders", "sender_peer_ids"),
    # tracker.ThrottledTracker.note_statuses moves the next fetch up and wakes the fetcher that waits on the event
    "hivemind.optim.progress_tracker.ProgressTracker": ("_get_local_progress", "performance_ema",
                                                        "global_state_updated", "next_fetch_time"),
    "hivemind.optim.state_averager.TrainingStateAverager": ("step_executor", "reuse_tensors", "offload_optimizer"),
}

__all__ = ["EpochDone", "HIVEMIND_INTERNALS", "HIVEMIND_OVERRIDES", "PeerStatus", "Swarm", "SwarmOptimizer", "make_optimizer",
           "quiet_hivemind"]

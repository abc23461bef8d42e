"""The exception tree. Every error a user can cause is an ``AtlasError`` whose message names the bad value and the fix.

    AtlasError                  base: the CLI prints ``str(err)`` and exits 2, never a traceback
    ├── ConfigError             a flag or config value is wrong (bad --batch-size, missing --run, ...)
    │   └── SpecError           a run spec is malformed or invalid (names the TOML field)
    │       └── SpecMismatch    the local spec differs from the swarm's (names each differing field)
    ├── DataError               the local data file is missing, unreadable or has the wrong columns
    ├── ModelError              the base model cannot be found/loaded, or the adapter shape is incompatible
    ├── CheckpointError         a saved checkpoint/adapter is corrupted or does not match the run
    ├── SwarmError              the peer-to-peer layer failed
    │   ├── PeersUnreachable    none of --initial-peers answered
    │   ├── RunNotFound         no peer in the swarm publishes the requested run id
    │   └── NotAdmitted         the run's [trust] admission does not let this peer in (allowlist, stake)
    ├── StorageError            content-addressed storage: a block is missing, or the IPFS daemon failed
    │   └── CorruptBlock        a block does not hash to its CID (corrupted or substituted); in storage/dag.py
    ├── ChainError              the staking contract or its chain said no, or could not be reached
    │   ├── ChainUnreachable    the RPC endpoint did not answer (transient: the receipt outbox retries)
    │   ├── TxReverted          the contract reverted; ``.error`` is the decoded custom error name (permanent)
    │   └── WalletError         the keystore file is missing, malformed, or the password is wrong
    └── ChainUnavailable        a notebook call that needs a chain was made on a run without one
"""


class AtlasError(Exception):
    """Base of every error caused by user input or the environment; its message is shown to the user as is."""


class ConfigError(AtlasError):
    pass


class SpecError(ConfigError):
    pass


class SpecMismatch(SpecError):
    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


class DataError(AtlasError):
    pass


class ModelError(AtlasError):
    pass


class CheckpointError(AtlasError):
    pass


class SwarmError(AtlasError):
    pass


class PeersUnreachable(SwarmError):
    pass


class RunNotFound(SwarmError):
    pass


class NotAdmitted(SwarmError):
    pass


class StorageError(AtlasError):
    pass


class ChainUnavailable(AtlasError):
    pass


class ChainError(AtlasError):
    pass


class ChainUnreachable(ChainError):
    pass


class TxReverted(ChainError):
    def __init__(self, message: str, error: str = "", args: tuple = ()):
        super().__init__(message)
        self.error = error
        self.error_args = args


class WalletError(ChainError):
    pass

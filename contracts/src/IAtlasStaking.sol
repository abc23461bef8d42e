// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title IAtlasStaking
/// @notice Staking, run escrow, group-co-signed receipts, quorum checkpoints and equivocation slashing for
///         atlas-swarm.
/// @dev A peer stakes native currency and binds its libp2p PeerID (hash) to its address. After each averaging
///      round the group's members sign one receipt (EIP-712) naming every member's weight and outlier flag; a member
///      is paid (weight x the run's rate, capped) only with signatures of more than half of the members listed,
///      each bound and staked, and only for epochs the run's clock has reached, within the epoch's shared budget.
///      Anyone may relay a receipt. Rewards become claimable after a challenge window. Two different receipts (or
///      checkpoint votes) one peer signed for the same (run, epoch) of a funded run let anyone slash it; the
///      reporter's bounty waits a challenge window, and the rest of the slash (with the peer's immature rewards) is
///      burned, so that reporting oneself is always a loss. A run's id commits to its trainer (runIdOf), so nobody
///      can squat it.
interface IAtlasStaking {
    // ------------------------------------------------------------------ types
    /// @notice One member of an averaging group, as its groupmates saw it in the round.
    struct Member {
        address wallet; // the address bound to the member's PeerID; paid if it signed the receipt
        bytes32 peerIdHash; // keccak256 of the member's libp2p PeerID bytes; must match registerPeer
        uint64 weight; // samples the member's update counted for in the round, after clamping
        bool flagged; // clipped or trimmed hard by the robust aggregation: paid nothing for this epoch
    }

    /// @notice What the members of one averaging group co-sign after their round (EIP-712, see RECEIPT_TYPEHASH).
    struct Receipt {
        bytes32 runId;
        uint64 epoch; // the swarm epoch whose samples the round averaged
        bytes32 resultHash; // sha256 of what the round produced (the aggregate), equal on every honest member
        Member[] members; // sorted by wallet, strictly increasing; at least two (solo epochs are not paid)
    }

    /// @notice What the trainer fixes when opening a run.
    struct RunTerms {
        uint128 rewardPerSample; // wei
        uint128 minStake; // wei of active stake a member needs for its signature and pay to count
        uint64 maxSamplesPerEpoch; // per peer and epoch; a larger receipt weight is paid this much
        uint64 samplesPerEpoch; // the whole run's pay per epoch, shared by every receipt of that epoch
        uint32 minEpochSeconds; // epoch e is paid only from createdAt + e * minEpochSeconds on
    }

    struct Run {
        address trainer;
        uint64 maxSamplesPerEpoch; // per peer; a larger receipt weight is paid this much
        uint32 closesAt; // 0 while open; closeRun sets it one challenge window ahead: receipts are paid until then
        bytes32 specHash; // sha256 of the canonical run spec
        uint128 rewardPerSample; // wei
        uint128 minStake; // wei of active stake a member needs for its signature and pay to count
        uint256 budget; // wei left in escrow
        uint256 funded; // wei ever put into the run; only a funded run's equivocations can be slashed
        uint64 samplesPerEpoch; // all receipts of one epoch together are paid at most this many samples
        uint32 minEpochSeconds; // the run's epochs advance no faster than this (receipts ahead of it wait)
        uint32 createdAt; // unix time of createRun: epoch e is payable from createdAt + e * minEpochSeconds
    }

    /// @notice What was paid for one epoch of a run, over all its receipts.
    struct EpochTally {
        uint64 samples; // samples paid (at most the run's samplesPerEpoch)
        uint32 payees; // members paid
    }

    /// @notice A checkpoint: the adapter the run holds at an epoch, voted by peers paid for the epoch before.
    struct Checkpoint {
        bytes32 cidDigest; // sha2-256 digest inside the adapter folder's CIDv1 (dag-pb)
        address publisher; // who recorded it (anyone may relay the votes)
        uint32 votes; // signatures of peers paid for epoch - 1
        uint32 recordedAt; // a conflicting checkpoint with more votes replaces it until recordedAt + CHALLENGE_WINDOW
    }

    /// @notice Everything known about a peer, in one call.
    struct Reputation {
        bytes32 peerIdHash;
        uint256 stake; // active stake
        uint256 unbonding; // requested for withdrawal, still slashable
        uint64 unbondingReadyAt;
        uint256 verifiedSamples;
        uint64 epochsContributed;
        uint32 timesSlashed;
        uint256 claimable; // rewards past their challenge window
        uint256 pending; // rewards still inside their challenge window
    }

    // ----------------------------------------------------------------- errors
    error InvalidParameters();
    error ZeroAmount();
    error InsufficientStake(uint256 available, uint256 required);
    error NothingToWithdraw();
    error UnbondingNotOver(uint64 readyAt);
    error AlreadyRegistered(address peer, bytes32 peerIdHash);
    error PeerNotRegistered(address peer);
    error RunExists(bytes32 runId);
    error UnknownRun(bytes32 runId);
    error RunClosed(bytes32 runId);
    error NotTrainer(address caller, address trainer);
    error InvalidSigner(address signer, address peer);
    error RunNotFunded(bytes32 runId);
    error RunStillClosing(bytes32 runId, uint32 closesAt);
    error AlreadyPaid(bytes32 runId, uint64 epoch, address peer);
    error BudgetExhausted(bytes32 runId, uint256 budget, uint256 reward);
    error LengthMismatch(uint256 items, uint256 signatures);
    error NotEquivocation();
    error AlreadySlashed(bytes32 runId, uint64 epoch, address peer);
    error NothingToSlash(address peer);
    error NothingToClaim();
    error TransferFailed(address to, uint256 amount);
    error CheckpointExists(bytes32 runId, uint64 epoch, bytes32 cidDigest);
    error InvalidGroup(uint256 members); // fewer than 2 members, more than MAX_MEMBERS, or not sorted by wallet
    error NoQuorum(uint256 signatures, uint256 members); // signatures of bound, staked members <= half the members
    error EpochAhead(bytes32 runId, uint64 epoch, uint64 payableUpTo);
    error CheckpointFinal(bytes32 runId, uint64 epoch, bytes32 cidDigest);
    error NotMoreVotes(uint256 votes, uint256 recorded);
    error NotAVoter(address voter); // not paid for the epoch before the checkpoint, unsorted, or duplicated

    // ----------------------------------------------------------------- events
    event Staked(address indexed peer, uint256 amount, uint256 stake);
    event UnstakeRequested(address indexed peer, uint256 amount, uint64 readyAt);
    event Withdrawn(address indexed peer, uint256 amount);
    event PeerRegistered(address indexed peer, bytes32 indexed peerIdHash);
    event RunCreated(bytes32 indexed runId, address indexed trainer, bytes32 specHash, uint256 rewardPerSample,
        uint256 minStake, uint64 maxSamplesPerEpoch, uint256 budget);
    event RunFunded(bytes32 indexed runId, address indexed funder, uint256 amount, uint256 budget);
    event RunClosing(bytes32 indexed runId, uint32 closesAt);
    event RunClosedAndRefunded(bytes32 indexed runId, address indexed trainer, uint256 refund);
    event Slashed(bytes32 indexed runId, uint64 indexed epoch, address indexed peer, address reporter,
        uint256 slashed, uint256 bounty, uint256 burned);
    event Claimed(address indexed account, uint256 amount);
    event CheckpointRecorded(bytes32 indexed runId, uint64 indexed epoch, address indexed publisher, bytes32 cidDigest);
    /// @notice One member paid by a receipt (samples after the per-peer cap and the epoch's share).
    event ContributionPaid(bytes32 indexed runId, uint64 indexed epoch, address indexed peer, uint64 samples,
        uint256 reward);
    /// @notice A receipt was settled: `paid` of its members were paid now (0: all of them were already).
    event ReceiptSettled(bytes32 indexed runId, uint64 indexed epoch, bytes32 indexed digest, uint256 paid,
        uint256 samples);
    event CheckpointReplaced(bytes32 indexed runId, uint64 indexed epoch, bytes32 oldCidDigest, bytes32 cidDigest,
        uint256 votes);

    // ------------------------------------------------------------------ views
    /// @notice The state of a run.
    function getRun(bytes32 runId) external view returns (Run memory);

    /// @notice Stake, counters and rewards of `peer`.
    function reputationOf(address peer) external view returns (Reputation memory);

    /// @notice Whether `peer` was settled for (`runId`, `epoch`) by a receipt: paid, or at 0 samples (flagged, or
    ///         nothing left of the epoch's samples); settled peers are the epoch's payees and checkpoint voters.
    function paidFor(bytes32 runId, address peer, uint64 epoch) external view returns (bool);

    /// @notice The PeerID hash `peer` registered (zero if none). Several addresses may name one PeerID: the chain
    ///         cannot check a libp2p key, so a binding counts only with the PeerID's own signature off chain.
    function peerIdOf(address peer) external view returns (bytes32);

    /// @notice The id of the run `trainer` opens for `runTag`: keccak256(abi.encode(trainer, runTag)).
    function runIdOf(address trainer, bytes32 runTag) external pure returns (bytes32);

    /// @notice Wei burned by slashing (slashed stake less bounties, and forfeited rewards); held here forever.
    function burned() external view returns (uint256);

    /// @notice The published adapter of (`runId`, `epoch`): the sha2-256 digest of its CIDv1 (dag-pb), who
    ///         recorded it, its votes and when (zeros if none). It is final once CHALLENGE_WINDOW has passed.
    function checkpointOf(bytes32 runId, uint64 epoch) external view returns (Checkpoint memory);

    /// @notice EIP-712 digest each member signs for `receipt`.
    function receiptDigest(Receipt calldata receipt) external view returns (bytes32);

    /// @notice EIP-712 digest a voter signs for checkpoint (`runId`, `epoch`, `cidDigest`).
    function checkpointDigest(bytes32 runId, uint64 epoch, bytes32 cidDigest) external view returns (bytes32);

    /// @notice Samples and members paid so far for (`runId`, `epoch`).
    function epochTally(bytes32 runId, uint64 epoch) external view returns (EpochTally memory);

    /// @notice The highest epoch of `runId` that receipts can be paid for now.
    function payableEpoch(bytes32 runId) external view returns (uint64);

    // --------------------------------------------------------------- mutative
    /// @notice Add `msg.value` to the caller's active stake.
    function stake() external payable;

    /// @notice Move `amount` of active stake into unbonding; it stays slashable until `withdraw` is allowed.
    function requestUnstake(uint256 amount) external;

    /// @notice Withdraw all unbonded stake once the unbonding period has passed.
    function withdraw() external;

    /// @notice Bind the caller's address to a libp2p PeerID hash, once. Nobody can lock a PeerID out: another
    ///         address naming the same hash does not stop the PeerID's owner from naming it too.
    function registerPeer(bytes32 peerIdHash) external;

    /// @notice Open the run runIdOf(msg.sender, runTag) with `msg.value` as its reward budget.
    function createRun(bytes32 runTag, bytes32 specHash, RunTerms calldata terms) external payable
        returns (bytes32 runId);

    /// @notice Add `msg.value` to an open run's budget. Anyone may fund; only its trainer can take back what is left.
    function fundRun(bytes32 runId) external payable;

    /// @notice Start closing a run (trainer only): receipts are still paid for one challenge window, then
    ///         reclaimBudget refunds what is left. Accrued rewards stay with the peers.
    function closeRun(bytes32 runId) external;

    /// @notice After the closing window, refund the run's unspent budget to its trainer.
    function reclaimBudget(bytes32 runId) external;

    /// @notice Pay the members of an averaging group for one epoch. Valid only when more than half of the listed
    ///         members signed it and are bound (registerPeer) and staked (minStake); `signatures[i]` is member i's
    ///         (empty: did not sign). Each signer that is bound, staked, not flagged and not yet paid for this epoch
    ///         is paid min(weight, maxSamplesPerEpoch, what is left of samplesPerEpoch) x rewardPerSample. Members
    ///         who did not sign are paid nothing by it. Anyone may relay; settling a receipt again pays nobody twice.
    function settleReceipt(Receipt calldata receipt, bytes[] calldata signatures) external;

    /// @notice settleReceipt for several receipts in one transaction (one per group and epoch).
    function settleReceipts(Receipt[] calldata receipts, bytes[][] calldata signatures) external;

    /// @notice Slash a peer that signed two different receipts for the same (run, epoch). Permissionless.
    ///         The reporter's bounty (BOUNTY_BPS of the slash) matures like a reward; the rest is burned, with the
    ///         peer's immature rewards, so that reporting oneself is always a loss.
    function slashConflictingReceipts(Receipt calldata a, bytes calldata sigA, Receipt calldata b,
        bytes calldata sigB, address peer) external;

    /// @notice Slash a peer that voted for two different checkpoints of the same (run, epoch). Permissionless.
    function slashConflictingVotes(bytes32 runId, uint64 epoch, bytes32 cidA, bytes calldata sigA, bytes32 cidB,
        bytes calldata sigB, address peer) external;

    /// @notice Record the CID of the adapter peers hold at `epoch` (after `epoch` optimizer steps). `voters`
    ///         (sorted, strictly increasing) each signed checkpointDigest and each was paid for `epoch - 1`; they
    ///         must be more than half of the peers paid for `epoch - 1` so far. Within CHALLENGE_WINDOW of its
    ///         recording, a different CID with more votes replaces it; after that it is final. A voter that voted
    ///         for an earlier recorded checkpoint of this epoch signed two CIDs for it: it is slashed as
    ///         slashConflictingVotes would, and the caller gets the bounty.
    /// @param cidDigest the sha2-256 digest inside the adapter folder's CIDv1 (dag-pb): the CID is 0x01 0x70 0x12 0x20
    ///        followed by it
    function recordCheckpoint(bytes32 runId, uint64 epoch, bytes32 cidDigest, address[] calldata voters,
        bytes[] calldata signatures) external;

    /// @notice Pay out the caller's rewards that are past their challenge window (and any bounties).
    function claim() external;
}

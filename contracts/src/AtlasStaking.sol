// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IAtlasStaking} from "./IAtlasStaking.sol";

/// @title AtlasStaking
/// @notice Peers stake, are paid from the trainer's escrow for the epochs their averaging group co-signed (EIP-712
///         receipts), and are slashed for signing two receipts (or two checkpoint votes) of one epoch. See IAtlasStaking for the interface and NatSpec of every external function.
///         Conservation: this contract's balance always equals active + unbonding stake + run budgets + claimable +
///         bucketed rewards + burned (tested as a forge invariant).
/// @dev Storage is packed so that a paid member costs few writes: one bit in an epoch bitmap, one stats slot and
///      one reward-bucket slot; a receipt adds the run budget and the epoch's tally. Rewards accrue into time buckets of CHALLENGE_WINDOW seconds; a
///      bucket becomes claimable two buckets later, so every reward waits at least one full window.
contract AtlasStaking is IAtlasStaking, EIP712, ReentrancyGuard {
    // ------------------------------------------------------------------ state
    bytes32 public constant MEMBER_TYPEHASH =
        keccak256("Member(address wallet,bytes32 peerIdHash,uint64 weight,bool flagged)");
    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 runId,uint64 epoch,bytes32 resultHash,Member[] members)"
        "Member(address wallet,bytes32 peerIdHash,uint64 weight,bool flagged)"
    );
    bytes32 public constant CHECKPOINT_TYPEHASH = keccak256("Checkpoint(bytes32 runId,uint64 epoch,bytes32 cidDigest)");
    /// @notice The largest group a receipt may list (signers are counted in one 256-bit word).
    uint256 public constant MAX_MEMBERS = 64;
    uint256 private constant BPS = 10_000;
    /// @dev What a slash punishes: two receipts of one epoch, or two checkpoint votes of one epoch.
    uint8 private constant WORK = 0;
    uint8 private constant VOTE = 1;

    /// @notice Seconds between requestUnstake and withdraw; at least two challenge windows.
    uint32 public immutable UNBONDING_PERIOD;
    /// @notice Seconds a reward waits (at least) before it can be claimed, so equivocation can be reported.
    uint32 public immutable CHALLENGE_WINDOW;
    /// @notice Share of a peer's stake (active + unbonding) taken per equivocation, in basis points.
    uint16 public immutable SLASH_BPS;
    /// @notice Share of the slashed amount paid to the reporter, in basis points; the rest goes to the run's budget.
    uint16 public immutable BOUNTY_BPS;

    struct StakeInfo {
        uint112 active;
        uint112 unbonding;
        uint32 unbondingReadyAt;
    }

    struct Stats {
        uint96 verifiedSamples;
        uint48 epochsContributed;
        uint32 timesSlashed;
    }

    /// @dev Two reward buckets (the two most recent windows with accruals); older ones are settled to `_claimable`.
    struct Buckets {
        uint96 amount0;
        uint32 index0;
        uint96 amount1;
        uint32 index1;
    }

    mapping(address => StakeInfo) private _stakes;
    mapping(address => Stats) private _stats;
    mapping(address => Buckets) private _buckets;
    mapping(address => uint256) private _claimable;
    mapping(address => bytes32) private _peerIdOf;
    mapping(bytes32 => Run) private _runs;
    /// @dev runId => peer => epoch / 256 => bitmap of paid epochs
    mapping(bytes32 => mapping(address => mapping(uint256 => uint256))) private _paid;
    /// @dev keccak256(runId, peer, epoch, WORK or VOTE) => slashed already
    mapping(bytes32 => bool) private _slashed;
    /// @inheritdoc IAtlasStaking
    uint256 public burned;

    /// @dev runId => epoch => the published adapter's CID digest
    mapping(bytes32 => mapping(uint64 => Checkpoint)) private _checkpoints;
    /// @dev runId => epoch => samples and members paid by receipts
    mapping(bytes32 => mapping(uint64 => EpochTally)) private _tallies;
    /// @dev runId => epoch => voter => the CID digest of the last recorded checkpoint it voted for
    mapping(bytes32 => mapping(uint64 => mapping(address => bytes32))) private _votes;

    // ------------------------------------------------------------ constructor
    constructor(uint32 unbondingPeriod, uint32 challengeWindow, uint16 slashBps, uint16 bountyBps)
        EIP712("AtlasStaking", "1")
    {
        if (challengeWindow == 0 || unbondingPeriod < 2 * uint256(challengeWindow) || slashBps == 0
            || slashBps > BPS || bountyBps > BPS) revert InvalidParameters();
        UNBONDING_PERIOD = unbondingPeriod;
        CHALLENGE_WINDOW = challengeWindow;
        SLASH_BPS = slashBps;
        BOUNTY_BPS = bountyBps;
    }

    // ------------------------------------------------------------------ views
    /// @inheritdoc IAtlasStaking
    function getRun(bytes32 runId) external view returns (Run memory) {
        return _runs[runId];
    }

    /// @inheritdoc IAtlasStaking
    function reputationOf(address peer) external view returns (Reputation memory r) {
        StakeInfo memory s = _stakes[peer];
        Stats memory st = _stats[peer];
        (uint256 mature, uint256 immature) = _splitBuckets(_buckets[peer]);
        r = Reputation({
            peerIdHash: _peerIdOf[peer],
            stake: s.active,
            unbonding: s.unbonding,
            unbondingReadyAt: s.unbondingReadyAt,
            verifiedSamples: st.verifiedSamples,
            epochsContributed: st.epochsContributed,
            timesSlashed: st.timesSlashed,
            claimable: _claimable[peer] + mature,
            pending: immature
        });
    }

    /// @inheritdoc IAtlasStaking
    function paidFor(bytes32 runId, address peer, uint64 epoch) public view returns (bool) {
        return _paid[runId][peer][epoch >> 8] & (1 << (epoch & 0xff)) != 0;
    }

    /// @inheritdoc IAtlasStaking
    function peerIdOf(address peer) external view returns (bytes32) {
        return _peerIdOf[peer];
    }

    /// @inheritdoc IAtlasStaking
    function runIdOf(address trainer, bytes32 runTag) public pure returns (bytes32) {
        return keccak256(abi.encode(trainer, runTag));
    }

    /// @inheritdoc IAtlasStaking
    function checkpointOf(bytes32 runId, uint64 epoch) external view returns (Checkpoint memory) {
        return _checkpoints[runId][epoch];
    }

    /// @inheritdoc IAtlasStaking
    function receiptDigest(Receipt calldata receipt) public view returns (bytes32) {
        uint256 n = receipt.members.length;
        bytes32[] memory hashes = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            Member calldata m = receipt.members[i];
            hashes[i] = keccak256(abi.encode(MEMBER_TYPEHASH, m.wallet, m.peerIdHash, m.weight, m.flagged));
        }
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    RECEIPT_TYPEHASH, receipt.runId, receipt.epoch, receipt.resultHash,
                    keccak256(abi.encodePacked(hashes))
                )
            )
        );
    }

    /// @inheritdoc IAtlasStaking
    function checkpointDigest(bytes32 runId, uint64 epoch, bytes32 cidDigest) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(CHECKPOINT_TYPEHASH, runId, epoch, cidDigest)));
    }

    /// @inheritdoc IAtlasStaking
    function epochTally(bytes32 runId, uint64 epoch) external view returns (EpochTally memory) {
        return _tallies[runId][epoch];
    }

    /// @inheritdoc IAtlasStaking
    function payableEpoch(bytes32 runId) public view returns (uint64) {
        Run storage run = _runs[runId];
        if (run.trainer == address(0)) revert UnknownRun(runId);
        return uint64((block.timestamp - run.createdAt) / run.minEpochSeconds);
    }

    // --------------------------------------------------------------- mutative
    /// @inheritdoc IAtlasStaking
    function stake() external payable {
        if (msg.value == 0) revert ZeroAmount();
        StakeInfo storage s = _stakes[msg.sender];
        s.active += SafeCast.toUint112(msg.value);
        emit Staked(msg.sender, msg.value, s.active);
    }

    /// @inheritdoc IAtlasStaking
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        StakeInfo storage s = _stakes[msg.sender];
        if (amount > s.active) revert InsufficientStake(s.active, amount);
        s.active -= uint112(amount);
        s.unbonding += uint112(amount);
        s.unbondingReadyAt = uint32(block.timestamp + UNBONDING_PERIOD);
        emit UnstakeRequested(msg.sender, amount, s.unbondingReadyAt);
    }

    /// @inheritdoc IAtlasStaking
    function withdraw() external nonReentrant {
        StakeInfo storage s = _stakes[msg.sender];
        uint256 amount = s.unbonding;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < s.unbondingReadyAt) revert UnbondingNotOver(s.unbondingReadyAt);
        s.unbonding = 0;
        emit Withdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    /// @inheritdoc IAtlasStaking
    function registerPeer(bytes32 peerIdHash) external {
        if (peerIdHash == bytes32(0)) revert InvalidParameters();
        bytes32 current = _peerIdOf[msg.sender];
        if (current != bytes32(0)) revert AlreadyRegistered(msg.sender, current);
        _peerIdOf[msg.sender] = peerIdHash;
        emit PeerRegistered(msg.sender, peerIdHash);
    }

    /// @inheritdoc IAtlasStaking
    function createRun(bytes32 runTag, bytes32 specHash, RunTerms calldata terms) external payable
        returns (bytes32 runId)
    {
        if (runTag == bytes32(0) || terms.maxSamplesPerEpoch == 0 || terms.samplesPerEpoch == 0
            || terms.minEpochSeconds == 0) revert InvalidParameters();
        runId = runIdOf(msg.sender, runTag); // another caller's createRun lands elsewhere: no squatting
        if (_runs[runId].trainer != address(0)) revert RunExists(runId);
        _runs[runId] = Run({
            trainer: msg.sender,
            maxSamplesPerEpoch: terms.maxSamplesPerEpoch,
            closesAt: 0,
            specHash: specHash,
            rewardPerSample: terms.rewardPerSample,
            minStake: terms.minStake,
            budget: msg.value,
            funded: msg.value,
            samplesPerEpoch: terms.samplesPerEpoch,
            minEpochSeconds: terms.minEpochSeconds,
            createdAt: uint32(block.timestamp)
        });
        emit RunCreated(runId, msg.sender, specHash, terms.rewardPerSample, terms.minStake, terms.maxSamplesPerEpoch,
            msg.value);
    }

    /// @inheritdoc IAtlasStaking
    function fundRun(bytes32 runId) external payable {
        if (msg.value == 0) revert ZeroAmount();
        Run storage run = _openRun(runId);
        if (run.closesAt != 0) revert RunClosed(runId);
        run.budget += msg.value;
        run.funded += msg.value;
        emit RunFunded(runId, msg.sender, msg.value, run.budget);
    }

    /// @inheritdoc IAtlasStaking
    function closeRun(bytes32 runId) external {
        Run storage run = _openRun(runId);
        if (msg.sender != run.trainer) revert NotTrainer(msg.sender, run.trainer);
        if (run.closesAt != 0) revert RunClosed(runId);
        // Receipts already signed (queued in peers' outboxes) are still paid for a whole challenge window.
        run.closesAt = uint32(block.timestamp + CHALLENGE_WINDOW);
        emit RunClosing(runId, run.closesAt);
    }

    /// @inheritdoc IAtlasStaking
    function reclaimBudget(bytes32 runId) external nonReentrant {
        Run storage run = _runs[runId];
        if (run.trainer == address(0)) revert UnknownRun(runId);
        if (msg.sender != run.trainer) revert NotTrainer(msg.sender, run.trainer);
        if (run.closesAt == 0 || block.timestamp < run.closesAt) revert RunStillClosing(runId, run.closesAt);
        uint256 refund = run.budget;
        run.budget = 0;
        emit RunClosedAndRefunded(runId, msg.sender, refund);
        if (refund != 0) _send(msg.sender, refund);
    }

    /// @inheritdoc IAtlasStaking
    function settleReceipt(Receipt calldata receipt, bytes[] calldata signatures) external {
        _settle(receipt, signatures);
    }

    /// @inheritdoc IAtlasStaking
    function settleReceipts(Receipt[] calldata receipts, bytes[][] calldata signatures) external {
        if (receipts.length != signatures.length || receipts.length == 0) {
            revert LengthMismatch(receipts.length, signatures.length);
        }
        for (uint256 i = 0; i < receipts.length; ++i) {
            _settle(receipts[i], signatures[i]);
        }
    }

    /// @inheritdoc IAtlasStaking
    function slashConflictingReceipts(Receipt calldata a, bytes calldata sigA, Receipt calldata b,
        bytes calldata sigB, address peer) external
    {
        bytes32 digestA = receiptDigest(a);
        bytes32 digestB = receiptDigest(b);
        if (a.runId != b.runId || a.epoch != b.epoch || digestA == digestB) revert NotEquivocation();
        _checkSigner(digestA, sigA, peer);
        _checkSigner(digestB, sigB, peer);
        _slash(a.runId, a.epoch, peer, WORK);
    }

    /// @inheritdoc IAtlasStaking
    function slashConflictingVotes(bytes32 runId, uint64 epoch, bytes32 cidA, bytes calldata sigA, bytes32 cidB,
        bytes calldata sigB, address peer) external
    {
        if (cidA == cidB) revert NotEquivocation();
        _checkSigner(checkpointDigest(runId, epoch, cidA), sigA, peer);
        _checkSigner(checkpointDigest(runId, epoch, cidB), sigB, peer);
        _slash(runId, epoch, peer, VOTE);
    }

    /// @inheritdoc IAtlasStaking
    function recordCheckpoint(bytes32 runId, uint64 epoch, bytes32 cidDigest, address[] calldata voters,
        bytes[] calldata signatures) external
    {
        if (_runs[runId].trainer == address(0)) revert UnknownRun(runId);
        if (cidDigest == bytes32(0) || epoch == 0) revert InvalidParameters();
        if (voters.length != signatures.length) revert LengthMismatch(voters.length, signatures.length);
        bytes32 digest = checkpointDigest(runId, epoch, cidDigest);
        address previous;
        for (uint256 i = 0; i < voters.length; ++i) {
            address v = voters[i];
            if (v <= previous || !paidFor(runId, v, epoch - 1)) revert NotAVoter(v);
            _checkSigner(digest, signatures[i], v);
            previous = v;
        }
        uint256 payees = _tallies[runId][epoch - 1].payees;
        if (voters.length < 2 || 2 * voters.length <= payees) revert NoQuorum(voters.length, payees);
        Checkpoint storage c = _checkpoints[runId][epoch];
        bytes32 old = c.cidDigest;
        if (old == cidDigest) revert CheckpointExists(runId, epoch, old);
        if (old != bytes32(0)) {
            if (block.timestamp >= uint256(c.recordedAt) + CHALLENGE_WINDOW) revert CheckpointFinal(runId, epoch, old);
            if (voters.length <= c.votes) revert NotMoreVotes(voters.length, c.votes);
            emit CheckpointReplaced(runId, epoch, old, cidDigest, voters.length);
        }
        _checkpoints[runId][epoch] = Checkpoint({
            cidDigest: cidDigest,
            publisher: msg.sender,
            votes: uint32(voters.length),
            recordedAt: uint32(block.timestamp)
        });
        emit CheckpointRecorded(runId, epoch, msg.sender, cidDigest);
        // A voter of the checkpoint this one replaces signed both CIDs (each signature was checked when its
        // checkpoint was recorded): slashed here, the relayer of the replacement earning the bounty.
        mapping(address => bytes32) storage votes = _votes[runId][epoch];
        for (uint256 i = 0; i < voters.length; ++i) {
            bytes32 prior = votes[voters[i]];
            if (prior == cidDigest) continue;
            votes[voters[i]] = cidDigest;
            if (prior != bytes32(0)) _slashDoubleVote(runId, epoch, voters[i]);
        }
    }

    /// @inheritdoc IAtlasStaking
    function claim() external nonReentrant {
        (uint256 mature,) = _splitBuckets(_buckets[msg.sender]);
        if (mature != 0) _dropMatureBuckets(msg.sender);
        uint256 amount = _claimable[msg.sender] + mature;
        if (amount == 0) revert NothingToClaim();
        _claimable[msg.sender] = 0;
        emit Claimed(msg.sender, amount);
        _send(msg.sender, amount);
    }

    // --------------------------------------------------------------- internal
    /// @dev One receipt: quorum first (signatures of bound, staked members), then each such signer is paid once.
    function _settle(Receipt calldata receipt, bytes[] calldata signatures) private {
        Run storage run = _openRun(receipt.runId);
        uint256 n = receipt.members.length;
        if (n < 2 || n > MAX_MEMBERS) revert InvalidGroup(n);
        if (signatures.length != n) revert LengthMismatch(n, signatures.length);
        uint64 payable_ = uint64((block.timestamp - run.createdAt) / run.minEpochSeconds);
        if (receipt.epoch > payable_) revert EpochAhead(receipt.runId, receipt.epoch, payable_);
        bytes32 digest = receiptDigest(receipt);
        uint128 minStake = run.minStake;
        uint256 counted; // bit i: member i signed, is bound and staked
        uint256 votes;
        address previous;
        for (uint256 i = 0; i < n; ++i) {
            Member calldata m = receipt.members[i];
            if (m.wallet <= previous) revert InvalidGroup(n); // sorted: nobody is listed (and counted) twice
            previous = m.wallet;
            if (signatures[i].length == 0) continue;
            _checkSigner(digest, signatures[i], m.wallet);
            if (_peerIdOf[m.wallet] != m.peerIdHash || _stakes[m.wallet].active < minStake) continue;
            counted |= 1 << i;
            ++votes;
        }
        if (2 * votes <= n) revert NoQuorum(votes, n);
        (uint256 paid, uint256 samples) = _payMembers(run, receipt, counted);
        emit ReceiptSettled(receipt.runId, receipt.epoch, digest, paid, samples);
    }

    /// @dev Settles each counted member not yet settled for the epoch that is flagged or has a weight. An unflagged
    ///      one is paid min(weight, per-peer cap), scaled down pro rata (rounded down) when these claims exceed what
    ///      is left of the epoch's samples; a flagged one, and one scaled to 0, is settled at 0 samples. Settled
    ///      (paidFor) members are the epoch's payees, the witnesses of its rounds that vote on the next checkpoint:
    ///      colluders who take an epoch's samples first do not silence its honest groups.
    function _payMembers(Run storage run, Receipt calldata receipt, uint256 counted)
        private
        returns (uint256 paid, uint256 samples)
    {
        uint256 cap = run.maxSamplesPerEpoch;
        uint256 claimed;
        (counted, claimed) = _claims(receipt, counted, cap);
        uint256 left = run.samplesPerEpoch - _tallies[receipt.runId][receipt.epoch].samples;
        if (claimed < left) left = claimed; // then every claim is paid in full (s * claimed / claimed)
        uint256 spent;
        for (uint256 i = 0; counted >> i != 0; ++i) {
            if ((counted >> i) & 1 == 0) continue;
            uint256 s = receipt.members[i].flagged ? 0 : receipt.members[i].weight;
            if (s != 0) s = (s < cap ? s : cap) * left / claimed;
            spent = _pay(run, receipt, receipt.members[i].wallet, s, spent);
            ++paid;
            samples += s;
        }
        if (paid != 0) {
            EpochTally memory tally = _tallies[receipt.runId][receipt.epoch];
            run.budget -= spent; // written once per receipt
            tally.samples += uint64(samples);
            tally.payees += uint32(paid);
            _tallies[receipt.runId][receipt.epoch] = tally;
        }
    }

    /// @dev The counted members this receipt settles (flagged or a weight, not settled for the epoch yet) and the
    ///      sum of the unflagged ones' claims, each within the per-peer cap.
    function _claims(Receipt calldata receipt, uint256 counted, uint256 cap)
        private
        view
        returns (uint256 settles, uint256 claimed)
    {
        for (uint256 i = 0; counted >> i != 0; ++i) {
            if ((counted >> i) & 1 == 0) continue;
            Member calldata m = receipt.members[i];
            if ((!m.flagged && m.weight == 0) || paidFor(receipt.runId, m.wallet, receipt.epoch)) continue;
            settles |= 1 << i;
            if (!m.flagged) claimed += m.weight < cap ? m.weight : cap;
        }
    }

    /// @dev Settle one member for `s` samples (0 when the epoch's samples ran out: still a witness of the epoch);
    ///      returns `spent` with its reward added, never past the run's budget.
    function _pay(Run storage run, Receipt calldata receipt, address wallet, uint256 s, uint256 spent)
        private
        returns (uint256)
    {
        uint256 reward = s * run.rewardPerSample;
        spent += reward;
        if (spent > run.budget) revert BudgetExhausted(receipt.runId, run.budget, spent);
        _markPaid(receipt.runId, wallet, receipt.epoch, uint64(s));
        if (reward != 0) _accrue(wallet, reward);
        emit ContributionPaid(receipt.runId, receipt.epoch, wallet, uint64(s), reward);
        return spent;
    }

    /// @dev Replay protection (one payment per run, peer and epoch: no global nonce a relay could race) and counters.
    function _markPaid(bytes32 runId, address peer, uint64 epoch, uint64 samples) private {
        Stats memory st = _stats[peer];
        mapping(uint256 => uint256) storage bits = _paid[runId][peer];
        uint256 word = bits[epoch >> 8];
        uint256 bit = 1 << (epoch & 0xff);
        if (word & bit != 0) revert AlreadyPaid(runId, epoch, peer);
        bits[epoch >> 8] = word | bit;
        st.verifiedSamples += samples;
        if (samples != 0) st.epochsContributed += 1;
        _stats[peer] = st;
    }

    /// @dev The slash itself, once two conflicting signatures of `peer` are verified.
    function _slash(bytes32 runId, uint64 epoch, address peer, uint8 kind) private {
        // Only a run someone paid into counts: made-up runs would let a peer report itself at will.
        Run storage run = _runs[runId];
        if (run.trainer == address(0)) revert UnknownRun(runId);
        if (run.funded == 0) revert RunNotFunded(runId);
        bytes32 key = keccak256(abi.encode(runId, peer, epoch, kind));
        if (_slashed[key]) revert AlreadySlashed(runId, epoch, peer);

        _slashed[key] = true;
        uint256 amount = _takeStake(peer);
        uint256 forfeited = _forfeitImmatureRewards(peer);
        uint256 bounty = amount * BOUNTY_BPS / BPS;
        // The reporter may be the peer itself (or its friend): its bounty waits a challenge window like any reward,
        // and everything else is burned. Sent to a run's budget it could come back to a trainer the peer controls.
        if (bounty != 0) _accrue(msg.sender, bounty);
        uint256 gone = amount - bounty + forfeited;
        burned += gone;
        emit Slashed(runId, epoch, peer, msg.sender, amount, bounty, gone);
    }


    /// @dev A double vote seen by recordCheckpoint: slashed unless it already was, or nothing is left to take, or
    ///      nobody ever paid into the run (then _slash would revert, and the replacement with it).
    function _slashDoubleVote(bytes32 runId, uint64 epoch, address peer) private {
        StakeInfo memory s = _stakes[peer];
        if (_slashed[keccak256(abi.encode(runId, peer, epoch, VOTE))] || uint256(s.active) + s.unbonding == 0
            || _runs[runId].funded == 0) return;
        _slash(runId, epoch, peer, VOTE);
    }

    /// @dev Takes SLASH_BPS of the peer's stake, active first, then unbonding.
    function _takeStake(address peer) private returns (uint256 amount) {
        StakeInfo memory s = _stakes[peer];
        uint256 total = uint256(s.active) + s.unbonding;
        if (total == 0) revert NothingToSlash(peer);
        amount = total * SLASH_BPS / BPS;
        uint256 fromActive = amount < s.active ? amount : s.active;
        s.active -= uint112(fromActive);
        s.unbonding -= uint112(amount - fromActive);
        _stakes[peer] = s;
        _stats[peer].timesSlashed += 1;
    }

    /// @dev Rewards still inside their challenge window are forfeited (burned by the caller); those past it were
    ///      earned before the report.
    function _forfeitImmatureRewards(address peer) private returns (uint256 forfeited) {
        uint256 mature;
        (mature, forfeited) = _splitBuckets(_buckets[peer]);
        if (mature != 0) _claimable[peer] += mature;
        delete _buckets[peer];
    }

    /// @dev A run that exists and whose budget was not refunded (it may be inside its closing window).
    function _openRun(bytes32 runId) private view returns (Run storage run) {
        run = _runs[runId];
        if (run.trainer == address(0)) revert UnknownRun(runId);
        if (run.closesAt != 0 && block.timestamp >= run.closesAt) revert RunClosed(runId);
    }

    function _checkSigner(bytes32 digest, bytes calldata signature, address peer) private pure {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || signer != peer) revert InvalidSigner(signer, peer);
    }

    /// @dev Adds `amount` to the bucket of the current window. A bucket that has to make room is always mature:
    ///      bucket0 < bucket1 < current window, so bucket0 is at least two windows old.
    function _accrue(address peer, uint256 amount) private {
        Buckets memory b = _buckets[peer];
        uint32 current = uint32(block.timestamp / CHALLENGE_WINDOW);
        if (b.amount1 != 0 && b.index1 == current) {
            b.amount1 += SafeCast.toUint96(amount);
        } else {
            if (b.amount0 != 0) _claimable[peer] += b.amount0;
            (b.amount0, b.index0) = (b.amount1, b.index1);
            (b.amount1, b.index1) = (SafeCast.toUint96(amount), current);
        }
        _buckets[peer] = b;
    }

    function _splitBuckets(Buckets memory b) private view returns (uint256 mature, uint256 immature) {
        uint256 current = block.timestamp / CHALLENGE_WINDOW;
        if (uint256(b.index0) + 2 <= current) mature += b.amount0;
        else immature += b.amount0;
        if (uint256(b.index1) + 2 <= current) mature += b.amount1;
        else immature += b.amount1;
    }

    function _dropMatureBuckets(address peer) private {
        Buckets memory b = _buckets[peer];
        uint256 current = block.timestamp / CHALLENGE_WINDOW;
        if (uint256(b.index0) + 2 <= current) (b.amount0, b.index0) = (0, 0);
        if (uint256(b.index1) + 2 <= current) (b.amount1, b.index1) = (0, 0);
        _buckets[peer] = b;
    }

    function _send(address to, uint256 amount) private {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed(to, amount);
    }
}

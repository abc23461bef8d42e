// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AtlasStaking} from "../src/AtlasStaking.sol";
import {IAtlasStaking} from "../src/IAtlasStaking.sol";
import {TestBase} from "./utils/Vm.sol";

/// @dev Paid only for witnessed work: receipts co-signed by a group, epochs anchored to time, checkpoints by quorum.
///      Four staked, registered members (sorted by wallet) in one run of 10 ether; 60 s minimum epochs.
contract AtlasStakingReceiptsTest is TestBase {
    uint32 constant WINDOW = 1 days;
    uint128 constant RATE = 1e12;
    uint128 constant MIN_STAKE = 1 ether;
    uint64 constant CAP = 1024; // per peer and epoch
    uint64 constant EPOCH_SAMPLES = 2048; // the whole run, per epoch
    uint32 constant EPOCH_SECONDS = 60;
    bytes32 constant TAG = keccak256("minilm-topics-0123456789abcdef");

    AtlasStaking staking;
    bytes32 RUN;
    address trainer = address(0x7EA);
    uint256[4] keys;
    address[4] wallets;

    function setUp() public {
        vm.warp(1_700_000_000);
        staking = new AtlasStaking(7 days, WINDOW, 5_000, 2_000);
        vm.deal(trainer, 100 ether);
        vm.prank(trainer);
        RUN = staking.createRun{value: 10 ether}(TAG, keccak256("spec"), _terms());
        uint256[4] memory candidates = [uint256(0xA11CE), 0xB0B, 0xC4A7, 0xD0D0];
        // sorted by address, as a receipt lists its members
        for (uint256 i = 0; i < 4; ++i) {
            for (uint256 j = i + 1; j < 4; ++j) {
                if (vm.addr(candidates[j]) < vm.addr(candidates[i])) {
                    (candidates[i], candidates[j]) = (candidates[j], candidates[i]);
                }
            }
        }
        for (uint256 i = 0; i < 4; ++i) {
            keys[i] = candidates[i];
            wallets[i] = vm.addr(keys[i]);
            _join(wallets[i], i);
        }
        vm.warp(block.timestamp + 1000 * uint256(EPOCH_SECONDS)); // epochs 0..1000 are payable
    }

    // ---------------------------------------------------------------- helpers
    function _terms() internal pure returns (IAtlasStaking.RunTerms memory) {
        return IAtlasStaking.RunTerms({rewardPerSample: RATE, minStake: MIN_STAKE, maxSamplesPerEpoch: CAP,
            samplesPerEpoch: EPOCH_SAMPLES, minEpochSeconds: EPOCH_SECONDS});
    }

    function _join(address who, uint256 i) internal {
        vm.deal(who, 100 ether);
        vm.startPrank(who);
        staking.stake{value: 2 ether}();
        staking.registerPeer(_pid(i));
        vm.stopPrank();
    }

    function _pid(uint256 i) internal pure returns (bytes32) {
        return keccak256(abi.encode("peer", i));
    }

    /// @dev A receipt for members `idx` (indices into wallets, ascending) with `weight` each, nobody flagged.
    function _receipt(uint64 epoch, uint256[] memory idx, uint64 weight)
        internal
        view
        returns (IAtlasStaking.Receipt memory r)
    {
        r.runId = RUN;
        r.epoch = epoch;
        r.resultHash = keccak256(abi.encode("aggregate", epoch));
        r.members = new IAtlasStaking.Member[](idx.length);
        for (uint256 i = 0; i < idx.length; ++i) {
            r.members[i] = IAtlasStaking.Member({wallet: wallets[idx[i]], peerIdHash: _pid(idx[i]), weight: weight,
                flagged: false});
        }
    }

    function _all() internal pure returns (uint256[] memory idx) {
        idx = new uint256[](4);
        for (uint256 i = 0; i < 4; ++i) idx[i] = i;
    }

    function _pair(uint256 a, uint256 b) internal pure returns (uint256[] memory idx) {
        idx = new uint256[](2);
        (idx[0], idx[1]) = (a, b);
    }

    function _sig(uint256 key, bytes32 digest) internal returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    /// @dev Signatures of the members whose bit is set in `signers` (bit i: member i of the receipt).
    function _sign(IAtlasStaking.Receipt memory r, uint256[] memory idx, uint256 signers)
        internal
        returns (bytes[] memory sigs)
    {
        bytes32 digest = staking.receiptDigest(r);
        sigs = new bytes[](r.members.length);
        for (uint256 i = 0; i < r.members.length; ++i) {
            if ((signers >> i) & 1 == 1) sigs[i] = _sig(keys[idx[i]], digest);
        }
    }

    function _earned(address a) internal view returns (uint256) {
        IAtlasStaking.Reputation memory rep = staking.reputationOf(a);
        return rep.claimable + rep.pending;
    }

    // ------------------------------------------------------------ happy paths
    function testFuzz_GroupIsPaidItsReceiptWeightsTimesRate(uint64 weight, uint64 epoch) public {
        weight = uint64(bound(weight, 1, EPOCH_SAMPLES / 4));
        epoch = uint64(bound(epoch, 0, 1000));
        IAtlasStaking.Receipt memory r = _receipt(epoch, _all(), weight);
        staking.settleReceipt(r, _sign(r, _all(), 0xF));
        for (uint256 i = 0; i < 4; ++i) {
            assertEq(_earned(wallets[i]), uint256(weight) * RATE, "paid weight x rate");
            assertTrue(staking.paidFor(RUN, wallets[i], epoch), "marked paid");
        }
        IAtlasStaking.EpochTally memory t = staking.epochTally(RUN, epoch);
        assertEq(t.samples, 4 * uint256(weight), "tally samples");
        assertEq(t.payees, 4, "tally payees");
        assertEq(staking.getRun(RUN).budget, 10 ether - 4 * uint256(weight) * RATE, "budget");
    }

    function test_ThreeOfFourSignIsAQuorumAndOnlySignersArePaid() public {
        IAtlasStaking.Receipt memory r = _receipt(5, _all(), 100);
        staking.settleReceipt(r, _sign(r, _all(), 0x7)); // member 3 did not sign
        assertEq(_earned(wallets[0]), 100 * RATE);
        assertEq(_earned(wallets[3]), 0, "a member who did not sign is not paid by it");
        // its signature arrives later (the same receipt, one more signature): paid then, the others not again
        staking.settleReceipt(r, _sign(r, _all(), 0xF));
        assertEq(_earned(wallets[3]), 100 * RATE, "paid once it signed");
        assertEq(_earned(wallets[0]), 100 * RATE, "not paid twice");
    }

    function testFuzz_WeightAboveTheCapIsPaidTheCap(uint64 weight) public {
        weight = uint64(bound(weight, CAP, type(uint64).max));
        IAtlasStaking.Receipt memory r = _receipt(1, _pair(0, 1), weight);
        staking.settleReceipt(r, _sign(r, _pair(0, 1), 0x3));
        assertEq(_earned(wallets[0]), uint256(CAP) * RATE);
        assertEq(staking.epochTally(RUN, 1).samples, 2 * uint256(CAP));
    }

    function test_EpochPayIsSharedByAllItsReceipts() public {
        // two groups of the same epoch: the second is paid what the first left of samplesPerEpoch
        IAtlasStaking.Receipt memory a = _receipt(7, _pair(0, 1), CAP);
        staking.settleReceipt(a, _sign(a, _pair(0, 1), 0x3)); // 2048: all of it
        IAtlasStaking.Receipt memory b = _receipt(7, _pair(2, 3), CAP);
        b.resultHash = keccak256("another group");
        staking.settleReceipt(b, _sign(b, _pair(2, 3), 0x3));
        assertEq(_earned(wallets[2]), 0, "nothing left for epoch 7");
        assertEq(staking.epochTally(RUN, 7).samples, EPOCH_SAMPLES, "never more than samplesPerEpoch");
        // ... but settled: they witnessed the round (they vote on the next checkpoint), and it is not posted again
        assertTrue(staking.paidFor(RUN, wallets[2], 7), "settled at 0 samples");
        assertEq(staking.epochTally(RUN, 7).payees, 4, "a witness of the epoch");
        IAtlasStaking.Receipt memory c = _receipt(8, _pair(2, 3), CAP);
        staking.settleReceipt(c, _sign(c, _pair(2, 3), 0x3));
        assertEq(_earned(wallets[2]), uint256(CAP) * RATE, "the next epoch has its own");
    }

    function testFuzz_AReceiptOverTheEpochsSamplesIsPaidProRata(uint64 first, uint64 w1, uint64 w2) public {
        // an earlier group took `first`, then a pair whose claims exceed what is left: each member gets its share of
        // the rest (rounded down); nobody is left out because of where its wallet sorts
        first = uint64(bound(first, 0, EPOCH_SAMPLES / 2));
        uint64[2] memory w = [uint64(bound(w1, 1, CAP)), uint64(bound(w2, 1, CAP))];
        if (first > 0) {
            IAtlasStaking.Receipt memory a = _receipt(2, _pair(0, 3), first);
            staking.settleReceipt(a, _sign(a, _pair(0, 3), 0x3));
        }
        uint256 left = EPOCH_SAMPLES - staking.epochTally(RUN, 2).samples;
        IAtlasStaking.Receipt memory r = _receipt(2, _pair(1, 2), 0);
        r.resultHash = keccak256("another group");
        (r.members[0].weight, r.members[1].weight) = (w[0], w[1]);
        staking.settleReceipt(r, _sign(r, _pair(1, 2), 0x3));
        uint256 claimed = uint256(w[0]) + w[1];
        for (uint256 i = 0; i < 2; ++i) {
            uint256 due = claimed > left ? uint256(w[i]) * left / claimed : w[i];
            assertEq(_earned(wallets[i + 1]), due * RATE, "its share of what was left");
            assertTrue(staking.paidFor(RUN, wallets[i + 1], 2), "settled");
        }
        assertLe(staking.epochTally(RUN, 2).samples, EPOCH_SAMPLES, "never more than samplesPerEpoch");
    }

    function test_BatchSettlesSeveralGroupsInOneTransaction() public {
        IAtlasStaking.Receipt[] memory rs = new IAtlasStaking.Receipt[](2);
        bytes[][] memory sigs = new bytes[][](2);
        rs[0] = _receipt(3, _pair(0, 1), 10);
        sigs[0] = _sign(rs[0], _pair(0, 1), 0x3);
        rs[1] = _receipt(3, _pair(2, 3), 20);
        sigs[1] = _sign(rs[1], _pair(2, 3), 0x3);
        staking.settleReceipts(rs, sigs);
        assertEq(_earned(wallets[1]), 10 * RATE);
        assertEq(_earned(wallets[3]), 20 * RATE);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.LengthMismatch.selector, 2, 1));
        staking.settleReceipts(rs, new bytes[][](1));
    }

    // ---------------------------------------------------------------- refused
    /// The drain of 186506a: 64 epochs from 10^9 at maxSamplesPerEpoch, paid from one peer's own claims. A receipt
    /// is needed now, and even a colluding pair's receipt cannot run ahead of the run's clock.
    function testFuzz_RevertEpochsAheadOfTheRunsClock(uint64 epoch) public {
        epoch = uint64(bound(epoch, 1001, type(uint64).max));
        IAtlasStaking.Receipt memory r = _receipt(epoch, _pair(0, 1), CAP);
        bytes[] memory sigs = _sign(r, _pair(0, 1), 0x3);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.EpochAhead.selector, RUN, epoch, uint64(1000)));
        staking.settleReceipt(r, sigs);
        assertEq(staking.payableEpoch(RUN), 1000);
    }

    function test_RevertSoloUnsortedOrDuplicatedMembers() public {
        uint256[] memory one = new uint256[](1);
        IAtlasStaking.Receipt memory solo = _receipt(1, one, 10);
        bytes[] memory s1 = _sign(solo, one, 0x1);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InvalidGroup.selector, 1));
        staking.settleReceipt(solo, s1); // solo epochs are not paid
        IAtlasStaking.Receipt memory twice = _receipt(1, _pair(0, 0), 10);
        bytes[] memory s2 = _sign(twice, _pair(0, 0), 0x3);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InvalidGroup.selector, 2));
        staking.settleReceipt(twice, s2); // one signer listed twice to make a "majority"
        IAtlasStaking.Receipt memory unsorted = _receipt(1, _pair(1, 0), 10);
        bytes[] memory s3 = _sign(unsorted, _pair(1, 0), 0x3);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InvalidGroup.selector, 2));
        staking.settleReceipt(unsorted, s3);
    }

    function test_RevertMinoritySignatures() public {
        IAtlasStaking.Receipt memory r = _receipt(2, _all(), 100);
        bytes[] memory sigs = _sign(r, _all(), 0x3); // 2 of 4 is not more than half
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NoQuorum.selector, 2, 4));
        staking.settleReceipt(r, sigs);
    }

    function test_RevertNonMembersSignature() public {
        IAtlasStaking.Receipt memory r = _receipt(2, _all(), 100);
        bytes[] memory sigs = _sign(r, _all(), 0x7);
        address outsider = vm.addr(0xBAD);
        sigs[3] = _sig(0xBAD, staking.receiptDigest(r)); // an outsider signs in member 3's place
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InvalidSigner.selector, outsider, wallets[3]));
        staking.settleReceipt(r, sigs);
    }

    function test_RevertSignaturesOfAnotherRunChainOrContractOrOtherWeights() public {
        IAtlasStaking.Receipt memory r = _receipt(2, _pair(0, 1), 100);
        bytes[] memory sigs = _sign(r, _pair(0, 1), 0x3);
        // the same signatures over another run's receipt
        vm.prank(trainer);
        bytes32 other = staking.createRun{value: 1 ether}(keccak256("other"), bytes32(0), _terms());
        vm.warp(block.timestamp + 3 * uint256(EPOCH_SECONDS)); // its epoch 2 is payable
        IAtlasStaking.Receipt memory moved = _receipt(2, _pair(0, 1), 100);
        moved.runId = other;
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.settleReceipt(moved, sigs);
        // weights raised after signing
        IAtlasStaking.Receipt memory raised = _receipt(2, _pair(0, 1), 101);
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.settleReceipt(raised, sigs);
        // signed for another deployment, or another chain
        AtlasStaking twin = new AtlasStaking(7 days, WINDOW, 5_000, 2_000);
        bytes[] memory twinSigs = new bytes[](2);
        twinSigs[0] = _sig(keys[0], twin.receiptDigest(r));
        twinSigs[1] = _sig(keys[1], twin.receiptDigest(r));
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.settleReceipt(r, twinSigs);
        uint256 chain = block.chainid;
        vm.chainId(chain + 1);
        bytes[] memory forkSigs = _sign(r, _pair(0, 1), 0x3);
        vm.chainId(chain);
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.settleReceipt(r, forkSigs);
    }

    function test_UnstakedOrUnboundMembersNeitherCountNorArePaid() public {
        // member 3 unbonds everything; member 2's wallet names another PeerID in the receipt
        vm.prank(wallets[3]);
        staking.requestUnstake(2 ether);
        IAtlasStaking.Receipt memory r = _receipt(4, _all(), 100);
        r.members[2].peerIdHash = keccak256("not the bound PeerID");
        bytes[] memory sigs = _sign(r, _all(), 0xF);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NoQuorum.selector, 2, 4));
        staking.settleReceipt(r, sigs); // 4 signatures, but only 2 from bound, staked members
        // in a group of 3 where 2 count, the quorum holds and the unstaked one is still not paid
        uint256[] memory three = new uint256[](3);
        (three[0], three[1], three[2]) = (0, 1, 3);
        IAtlasStaking.Receipt memory t = _receipt(4, three, 100);
        staking.settleReceipt(t, _sign(t, three, 0x7));
        assertEq(_earned(wallets[0]), 100 * RATE);
        assertEq(_earned(wallets[3]), 0, "unstaked: not paid");
    }

    function test_FlaggedMemberIsPaidNothing() public {
        IAtlasStaking.Receipt memory r = _receipt(6, _all(), 100);
        r.members[1].flagged = true;
        staking.settleReceipt(r, _sign(r, _all(), 0xF));
        assertEq(_earned(wallets[1]), 0, "flagged");
        assertEq(_earned(wallets[0]), 100 * RATE);
        // ... but settled at 0 samples: a witness of the round (a payee that votes on the next checkpoint)
        assertTrue(staking.paidFor(RUN, wallets[1], 6), "settled");
        assertEq(staking.reputationOf(wallets[1]).epochsContributed, 0, "no epoch contributed");
        assertEq(staking.epochTally(RUN, 6).payees, 4);
        assertEq(staking.epochTally(RUN, 6).samples, 300);
    }

    function test_ReplayedReceiptPaysNobodyTwice() public {
        IAtlasStaking.Receipt memory r = _receipt(9, _all(), 100);
        bytes[] memory sigs = _sign(r, _all(), 0xF);
        staking.settleReceipt(r, sigs);
        uint256 budget = staking.getRun(RUN).budget;
        vm.expectEmit(true, true, true, true);
        emit IAtlasStaking.ReceiptSettled(RUN, 9, staking.receiptDigest(r), 0, 0);
        staking.settleReceipt(r, sigs); // a relay posting it again: no revert (batches go on), no pay
        assertEq(staking.getRun(RUN).budget, budget);
        assertEq(_earned(wallets[0]), 100 * RATE);
    }

    // -------------------------------------------------------------- collusion
    /// A colluding pair of staked peers signs whatever it likes about itself. What that buys is bounded: one epoch's
    /// samplesPerEpoch per minEpochSeconds of the run's life, shared with every honest group of the epoch.
    function testFuzz_ColludingPairIsBoundedByTheRunsPace(uint32 elapsed, uint64 weight) public {
        vm.prank(trainer);
        bytes32 fresh = staking.createRun{value: 50 ether}(keccak256("fresh"), bytes32(0), _terms());
        elapsed = uint32(bound(elapsed, 0, 100 * uint256(EPOCH_SECONDS)));
        weight = uint64(bound(weight, 1, type(uint64).max));
        vm.warp(block.timestamp + elapsed);
        uint64 head = staking.payableEpoch(fresh);
        uint256 before = _earned(wallets[0]) + _earned(wallets[1]);
        for (uint64 e = 0; e <= head + 3; ++e) { // they try 3 epochs past the clock too
            IAtlasStaking.Receipt memory r = _receipt(e, _pair(0, 1), weight);
            r.runId = fresh;
            bytes[] memory sigs = _sign(r, _pair(0, 1), 0x3);
            if (e > head) vm.expectPartialRevert(IAtlasStaking.EpochAhead.selector);
            staking.settleReceipt(r, sigs);
        }
        uint256 gained = _earned(wallets[0]) + _earned(wallets[1]) - before;
        uint256 bound_ = (uint256(elapsed) / EPOCH_SECONDS + 1) * EPOCH_SAMPLES * RATE;
        assertLe(gained, bound_, "never more than samplesPerEpoch per epoch the clock allows");
    }

    // ----------------------------------------------------------- equivocation
    function test_TwoDifferentReceiptsForOneEpochAreSlashable() public {
        IAtlasStaking.Receipt memory a = _receipt(11, _all(), 100);
        IAtlasStaking.Receipt memory b = _receipt(11, _pair(0, 1), 300); // the same epoch told another way
        bytes32 da = staking.receiptDigest(a);
        bytes32 db = staking.receiptDigest(b);
        bytes memory sa = _sig(keys[0], da);
        bytes memory sb = _sig(keys[0], db);
        address reporter = address(0xBEEF);
        vm.prank(reporter);
        staking.slashConflictingReceipts(a, sa, b, sb, wallets[0]);
        IAtlasStaking.Reputation memory rep = staking.reputationOf(wallets[0]);
        assertEq(rep.stake, 1 ether, "half the stake slashed");
        assertEq(rep.timesSlashed, 1);
        assertEq(staking.reputationOf(reporter).pending, 0.2 ether, "bounty, maturing like a reward");
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.AlreadySlashed.selector, RUN, uint64(11), wallets[0]));
        staking.slashConflictingReceipts(a, sa, b, sb, wallets[0]);
        // the same receipt twice, or receipts of two epochs, are no equivocation
        vm.expectRevert(IAtlasStaking.NotEquivocation.selector);
        staking.slashConflictingReceipts(a, sa, a, sa, wallets[0]);
        IAtlasStaking.Receipt memory c = _receipt(12, _all(), 100);
        bytes memory sc = _sig(keys[0], staking.receiptDigest(c));
        vm.expectRevert(IAtlasStaking.NotEquivocation.selector);
        staking.slashConflictingReceipts(a, sa, c, sc, wallets[0]);
        // a signature by someone else does not slash the named peer
        bytes memory other = _sig(keys[1], db);
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.slashConflictingReceipts(a, _sig(keys[1], da), b, other, wallets[2]);
    }

    // ------------------------------------------------------------- checkpoints
    function _votes(uint64 epoch, bytes32 cid, uint256[] memory idx)
        internal
        returns (address[] memory voters, bytes[] memory sigs)
    {
        bytes32 digest = staking.checkpointDigest(RUN, epoch, cid);
        voters = new address[](idx.length);
        sigs = new bytes[](idx.length);
        for (uint256 i = 0; i < idx.length; ++i) {
            voters[i] = wallets[idx[i]];
            sigs[i] = _sig(keys[idx[i]], digest);
        }
    }

    function _settleAll(uint64 epoch) internal {
        IAtlasStaking.Receipt memory r = _receipt(epoch, _all(), 100);
        staking.settleReceipt(r, _sign(r, _all(), 0xF));
    }

    function test_CheckpointNeedsAMajorityOfThePeersPaidForTheEpochBefore() public {
        _settleAll(20);
        uint256[] memory three = new uint256[](3);
        (three[0], three[1], three[2]) = (0, 1, 2);
        (address[] memory v2, bytes[] memory s2) = _votes(21, keccak256("cid"), _pair(0, 1));
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NoQuorum.selector, 2, 4));
        staking.recordCheckpoint(RUN, 21, keccak256("cid"), v2, s2); // 2 of the 4 paid for epoch 20
        (address[] memory early, bytes[] memory se) = _votes(22, keccak256("cid"), three);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NotAVoter.selector, wallets[0]));
        staking.recordCheckpoint(RUN, 22, keccak256("cid"), early, se); // nobody was paid for epoch 21
        (address[] memory v3, bytes[] memory s3) = _votes(21, keccak256("cid"), three);
        vm.prank(address(0x5EED)); // anyone may relay the votes
        staking.recordCheckpoint(RUN, 21, keccak256("cid"), v3, s3);
        IAtlasStaking.Checkpoint memory c = staking.checkpointOf(RUN, 21);
        assertEq(c.cidDigest, keccak256("cid"));
        assertEq(c.votes, 3);
        assertEq(c.publisher, address(0x5EED));
    }

    /// A Sybil pair that settled its own receipt for an epoch records a bogus checkpoint first; the honest majority
    /// replaces it within the window, and then it is final.
    function test_BogusCheckpointIsReplacedByMoreVotesWithinItsWindow() public {
        // epoch 30: the pair (0, 1) settles its own receipt first, alone
        IAtlasStaking.Receipt memory own = _receipt(30, _pair(0, 1), 100);
        staking.settleReceipt(own, _sign(own, _pair(0, 1), 0x3));
        (address[] memory bv, bytes[] memory bs) = _votes(31, keccak256("bogus"), _pair(0, 1));
        staking.recordCheckpoint(RUN, 31, keccak256("bogus"), bv, bs);
        // the honest pair (2, 3) of the same epoch is paid too; now 4 peers were paid for epoch 30
        IAtlasStaking.Receipt memory honest = _receipt(30, _pair(2, 3), 100);
        honest.resultHash = keccak256("honest");
        staking.settleReceipt(honest, _sign(honest, _pair(2, 3), 0x3));
        uint256[] memory three = new uint256[](3);
        (three[0], three[1], three[2]) = (1, 2, 3); // one of the pair changes its mind and votes honestly
        (address[] memory hv, bytes[] memory hs) = _votes(31, keccak256("real"), three);
        vm.expectEmit(true, true, false, true);
        emit IAtlasStaking.CheckpointReplaced(RUN, 31, keccak256("bogus"), keccak256("real"), 3);
        // who voted for both is slashed by the replacement itself (half its 2 ether), its relayer earning the bounty
        vm.expectEmit(true, true, true, true);
        emit IAtlasStaking.Slashed(RUN, 31, wallets[1], address(0x5EED), 1 ether, 0.2 ether, 0.8 ether + 100 * RATE);
        vm.prank(address(0x5EED));
        staking.recordCheckpoint(RUN, 31, keccak256("real"), hv, hs);
        assertEq(staking.checkpointOf(RUN, 31).cidDigest, keccak256("real"));
        assertEq(staking.reputationOf(wallets[1]).timesSlashed, 1);
        assertEq(staking.reputationOf(wallets[1]).stake, 1 ether);
        assertEq(staking.reputationOf(address(0x5EED)).pending, 0.2 ether);
        for (uint256 i = 2; i < 4; ++i) assertEq(staking.reputationOf(wallets[i]).timesSlashed, 0); // one vote each
        assertEq(staking.reputationOf(wallets[0]).timesSlashed, 0); // voted once, for the replaced CID
        // ... once: reporting the same double vote again is refused
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.AlreadySlashed.selector, RUN, 31, wallets[1]));
        staking.slashConflictingVotes(RUN, 31, keccak256("bogus"), bs[1], keccak256("real"), hs[0], wallets[1]);
        // no more than the recorded votes, or after the window: refused
        (address[] memory again, bytes[] memory as_) = _votes(31, keccak256("bogus"), _pair(0, 1));
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NoQuorum.selector, 2, 4));
        staking.recordCheckpoint(RUN, 31, keccak256("bogus"), again, as_); // 2 of the 4 paid is no majority now
        (three[0], three[1], three[2]) = (0, 2, 3);
        (address[] memory tie, bytes[] memory ts) = _votes(31, keccak256("third"), three);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NotMoreVotes.selector, 3, 3));
        staking.recordCheckpoint(RUN, 31, keccak256("third"), tie, ts); // a tie does not replace
        vm.warp(block.timestamp + WINDOW);
        (address[] memory all4, bytes[] memory s4) = _votes(31, keccak256("late"), _all());
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.CheckpointFinal.selector, RUN, 31, keccak256("real")));
        staking.recordCheckpoint(RUN, 31, keccak256("late"), all4, s4);
    }

    /// A double voter with nothing left to slash, or one slashed for it already, does not block the replacement.
    function test_ReplacementGoesThroughWhenADoubleVoterHasNothingLeftOrWasSlashedAlready() public {
        IAtlasStaking.Receipt memory own = _receipt(50, _pair(0, 1), 100);
        staking.settleReceipt(own, _sign(own, _pair(0, 1), 0x3));
        vm.prank(wallets[0]); // wallet 0 leaves with all its stake, after unbonding
        staking.requestUnstake(2 ether);
        vm.warp(block.timestamp + 7 days);
        vm.prank(wallets[0]);
        staking.withdraw();
        (address[] memory bv, bytes[] memory bs) = _votes(51, keccak256("bogus"), _pair(0, 1));
        staking.recordCheckpoint(RUN, 51, keccak256("bogus"), bv, bs);
        IAtlasStaking.Receipt memory honest = _receipt(50, _pair(2, 3), 100);
        honest.resultHash = keccak256("honest");
        staking.settleReceipt(honest, _sign(honest, _pair(2, 3), 0x3));
        (address[] memory hv, bytes[] memory hs) = _votes(51, keccak256("real"), _all());
        // wallet 1's double vote is reported by hand first
        staking.slashConflictingVotes(RUN, 51, keccak256("bogus"), bs[1], keccak256("real"), hs[1], wallets[1]);
        staking.recordCheckpoint(RUN, 51, keccak256("real"), hv, hs);
        assertEq(staking.checkpointOf(RUN, 51).cidDigest, keccak256("real"));
        assertEq(staking.reputationOf(wallets[0]).timesSlashed, 0); // nothing to take
        assertEq(staking.reputationOf(wallets[1]).timesSlashed, 1); // not twice
        assertEq(staking.reputationOf(wallets[2]).timesSlashed, 0);
        assertEq(staking.reputationOf(wallets[3]).timesSlashed, 0);
    }

    function test_RevertUnsortedOrForgedVotes() public {
        _settleAll(40);
        uint256[] memory three = new uint256[](3);
        (three[0], three[1], three[2]) = (1, 0, 2);
        (address[] memory v, bytes[] memory s) = _votes(41, keccak256("cid"), three);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NotAVoter.selector, wallets[0]));
        staking.recordCheckpoint(RUN, 41, keccak256("cid"), v, s); // unsorted: a voter could be counted twice
        (three[0], three[1], three[2]) = (0, 1, 2);
        (v, s) = _votes(41, keccak256("cid"), three);
        vm.expectPartialRevert(IAtlasStaking.InvalidSigner.selector);
        staking.recordCheckpoint(RUN, 41, keccak256("other cid"), v, s); // votes for another CID
    }
}

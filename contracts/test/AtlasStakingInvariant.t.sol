// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AtlasStaking} from "../src/AtlasStaking.sol";
import {IAtlasStaking} from "../src/IAtlasStaking.sol";
import {TestBase} from "./utils/Vm.sol";
import {termsOf} from "./utils/Fixture.sol";

/// @dev What forge's invariant fuzzer calls, in random order with random arguments: every call that moves money,
///      by three peers who are also trainers, reporters and funders of two runs each. It keeps ghost books of what
///      each actor put in, took out and was credited (rewards and bounties as they accrue, others' funding of its
///      runs).
contract Handler is TestBase {
    AtlasStaking public immutable staking;
    uint256[3] internal keys = [uint256(0xA1), 0xA2, 0xA3];
    address[3] public actors;
    bytes32[] public runs;
    mapping(address => uint256) public putIn;
    mapping(address => uint256) public tookOut;
    mapping(address => uint256) public credited;

    constructor(AtlasStaking s) {
        staking = s;
        for (uint256 i = 0; i < 3; ++i) {
            actors[i] = vm.addr(keys[i]);
            vm.deal(actors[i], 1_000 ether);
            vm.prank(actors[i]);
            staking.registerPeer(keccak256(abi.encode("peer", i)));
        }
    }

    function runCount() external view returns (uint256) {
        return runs.length;
    }

    function _actor(uint256 seed) internal view returns (uint256 i, address a) {
        i = seed % 3;
        a = actors[i];
    }

    function _earned(address a) internal view returns (uint256) {
        IAtlasStaking.Reputation memory r = staking.reputationOf(a);
        return r.claimable + r.pending;
    }

    /// @dev Credits an actor with what an action accrued to it (rewards, bounties), never with what it lost.
    function _credit(address a, uint256 before) internal {
        uint256 afterwards = _earned(a);
        if (afterwards > before) credited[a] += afterwards - before;
    }

    function stake(uint256 who, uint256 amount) external {
        (, address a) = _actor(who);
        amount = bound(amount, 1, 10 ether);
        vm.prank(a);
        staking.stake{value: amount}();
        putIn[a] += amount;
    }

    function requestUnstake(uint256 who, uint256 amount) external {
        (, address a) = _actor(who);
        uint256 active = staking.reputationOf(a).stake;
        if (active == 0) return;
        vm.prank(a);
        staking.requestUnstake(bound(amount, 1, active));
    }

    function withdraw(uint256 who) external {
        (, address a) = _actor(who);
        IAtlasStaking.Reputation memory r = staking.reputationOf(a);
        if (r.unbonding == 0 || block.timestamp < r.unbondingReadyAt) return;
        vm.prank(a);
        staking.withdraw();
        tookOut[a] += r.unbonding;
    }

    function createRun(uint256 who, uint256 budget, uint128 rate) external {
        (, address a) = _actor(who);
        budget = bound(budget, 0, 20 ether);
        rate = uint128(bound(rate, 0, 1e15));
        vm.prank(a);
        runs.push(staking.createRun{value: budget}(keccak256(abi.encode(runs.length)), bytes32(0), termsOf(rate, 0, 1000)));
        putIn[a] += budget;
    }

    function fundRun(uint256 who, uint256 run, uint256 amount) external {
        if (runs.length == 0) return;
        (, address a) = _actor(who);
        bytes32 id = runs[run % runs.length];
        if (staking.getRun(id).closesAt != 0) return;
        amount = bound(amount, 1, 5 ether);
        vm.prank(a);
        staking.fundRun{value: amount}(id);
        putIn[a] += amount;
        // Funding someone else's run is a gift to its trainer (the CLI asks --not-mine for it): the trainer takes
        // back what is left at the close, so it counts as awarded to the trainer.
        address trainer = staking.getRun(id).trainer;
        if (trainer != a) credited[trainer] += amount;
    }

    function closeRun(uint256 run) external {
        if (runs.length == 0) return;
        bytes32 id = runs[run % runs.length];
        IAtlasStaking.Run memory r = staking.getRun(id);
        if (r.closesAt != 0) return;
        vm.prank(r.trainer);
        staking.closeRun(id);
    }

    function reclaimBudget(uint256 run) external {
        if (runs.length == 0) return;
        bytes32 id = runs[run % runs.length];
        IAtlasStaking.Run memory r = staking.getRun(id);
        if (r.closesAt == 0 || block.timestamp < r.closesAt) return;
        vm.prank(r.trainer);
        staking.reclaimBudget(id);
        tookOut[r.trainer] += r.budget;
    }

    /// @dev A receipt of all three actors (sorted by address) with random weights, flags and signers.
    function _receipt(bytes32 run, uint64 epoch, uint64 weights, uint8 flags)
        internal
        view
        returns (IAtlasStaking.Receipt memory r, uint256[3] memory order)
    {
        order = [uint256(0), 1, 2];
        for (uint256 i = 0; i < 3; ++i) {
            for (uint256 j = i + 1; j < 3; ++j) {
                if (actors[order[j]] < actors[order[i]]) (order[i], order[j]) = (order[j], order[i]);
            }
        }
        r.runId = run;
        r.epoch = epoch;
        r.members = new IAtlasStaking.Member[](3);
        for (uint256 i = 0; i < 3; ++i) {
            uint256 k = order[i];
            r.members[i] = IAtlasStaking.Member({wallet: actors[k], peerIdHash: keccak256(abi.encode("peer", k)),
                weight: uint64(bound(weights >> (16 * i) & 0xffff, 0, 2000)), flagged: (flags >> i) & 1 == 1});
        }
    }

    function settleReceipt(uint256 run, uint64 epoch, uint64 weights, uint8 flags, uint8 signers) external {
        if (runs.length == 0) return;
        bytes32 id = runs[run % runs.length];
        epoch = uint64(bound(epoch, 0, 20));
        (IAtlasStaking.Receipt memory r, uint256[3] memory order) = _receipt(id, epoch, weights, flags);
        bytes32 digest = staking.receiptDigest(r);
        bytes[] memory sigs = new bytes[](3);
        for (uint256 i = 0; i < 3; ++i) {
            if ((signers >> i) & 1 == 0) continue;
            sigs[i] = _sigOf(order[i], digest);
        }
        uint256[3] memory before;
        for (uint256 i = 0; i < 3; ++i) before[i] = _earned(actors[i]);
        try staking.settleReceipt(r, sigs) {
            for (uint256 i = 0; i < 3; ++i) _credit(actors[i], before[i]);
        } catch {} // no quorum, epoch ahead of the clock, run closed, budget short: nothing moved
    }

    function _sigOf(uint256 i, bytes32 digest) internal returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(keys[i], digest);
        return abi.encodePacked(r, s, v);
    }

    function slashReceipts(uint256 who, uint256 reporter, uint256 run, uint64 epoch) external {
        if (runs.length == 0) return;
        (uint256 i, address a) = _actor(who);
        (, address rep) = _actor(reporter);
        bytes32 id = runs[run % runs.length];
        IAtlasStaking.Reputation memory r = staking.reputationOf(a);
        if (staking.getRun(id).funded == 0 || r.stake + r.unbonding == 0) return;
        epoch = uint64(bound(epoch, 0, 20));
        (IAtlasStaking.Receipt memory x,) = _receipt(id, epoch, 1, 0);
        (IAtlasStaking.Receipt memory y,) = _receipt(id, epoch, 2, 0);
        bytes memory sx = _sigOf(i, staking.receiptDigest(x));
        bytes memory sy = _sigOf(i, staking.receiptDigest(y));
        uint256 stakeBefore = r.stake + r.unbonding;
        vm.prank(rep);
        try staking.slashConflictingReceipts(x, sx, y, sy, a) {
            IAtlasStaking.Reputation memory after_ = staking.reputationOf(a);
            credited[rep] += (stakeBefore - after_.stake - after_.unbonding) * staking.BOUNTY_BPS() / 10_000;
        } catch {} // AlreadySlashed for that (run, epoch): fine
    }

    /// @dev A checkpoint voted by a random subset of the actors for one of three CIDs: replacements happen, and
    ///      with them double votes, which recordCheckpoint slashes (the relayer earns the bounties).
    function recordCheckpoint(uint256 run, uint64 epoch, uint8 voters, uint256 cid, uint256 relayer) external {
        if (runs.length == 0) return;
        bytes32 id = runs[run % runs.length];
        (, uint256[3] memory order) = _receipt(id, 0, 0, 0); // the actors sorted by address
        // the first epoch from a random one on after an epoch at least two actors were paid for (voters must be)
        epoch = uint64(bound(epoch, 1, 21));
        for (uint256 k = 0; k < 21; ++k) {
            uint64 e = uint64((epoch - 1 + k) % 21 + 1);
            uint256 paid;
            for (uint256 i = 0; i < 3; ++i) if (staking.paidFor(id, actors[i], e - 1)) ++paid;
            if (paid >= 2) {
                epoch = e;
                break;
            }
        }
        if (voters & 8 != 0) voters = 7; // half the time everyone paid votes: the most votes, which can replace
        for (uint256 i = 0; i < 3; ++i) { // only those paid for the epoch before vote (others would be NotAVoter)
            if (!staking.paidFor(id, actors[order[i]], epoch - 1)) voters &= ~uint8(1 << i);
        }
        bytes32 digest = keccak256(abi.encode("cid", cid % 3));
        uint256 n;
        for (uint256 i = 0; i < 3; ++i) if ((voters >> i) & 1 == 1) ++n;
        address[] memory v = new address[](n);
        bytes[] memory sigs = new bytes[](n);
        n = 0;
        for (uint256 i = 0; i < 3; ++i) {
            if ((voters >> i) & 1 == 0) continue;
            v[n] = actors[order[i]];
            sigs[n++] = _sigOf(order[i], staking.checkpointDigest(id, epoch, digest));
        }
        (, address rel) = _actor(relayer);
        uint256[3] memory before;
        for (uint256 i = 0; i < 3; ++i) {
            IAtlasStaking.Reputation memory r = staking.reputationOf(actors[i]);
            before[i] = r.stake + r.unbonding;
        }
        vm.prank(rel);
        try staking.recordCheckpoint(id, epoch, digest, v, sigs) {
            for (uint256 i = 0; i < 3; ++i) {
                IAtlasStaking.Reputation memory r = staking.reputationOf(actors[i]);
                credited[rel] += (before[i] - r.stake - r.unbonding) * staking.BOUNTY_BPS() / 10_000;
            }
        } catch {} // no quorum, not voters, the same CID, fewer votes, final: nothing moved
    }

    /// @dev What random calls rarely line up: all three paid for one epoch, a checkpoint of two votes, then one of
    ///      all three for another CID (it replaces the first, and slashes the first two voters).
    function doubleVote(uint256 run, uint64 epoch, uint64 weights, uint256 relayer) external {
        epoch = uint64(bound(epoch, 0, 20)); // settleReceipt's epoch; recordCheckpoint's argument for epoch + 1
        this.settleReceipt(run, epoch, weights, 0, 7);
        this.recordCheckpoint(run, epoch, 3, 0, relayer);
        this.recordCheckpoint(run, epoch, 8, 1, relayer);
    }

    function claim(uint256 who) external {
        (, address a) = _actor(who);
        uint256 amount = staking.reputationOf(a).claimable;
        if (amount == 0) return;
        vm.prank(a);
        staking.claim();
        tookOut[a] += amount;
    }

    function warp(uint256 by) external {
        vm.warp(block.timestamp + bound(by, 1, 3 days));
    }
}

/// @dev Escrow conservation and "nobody takes out more than they put in plus what they were credited", under random
///      sequences of calls (forge invariant testing; the handler above is the only target).
contract AtlasStakingInvariantTest is TestBase {
    AtlasStaking staking;
    Handler handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        staking = new AtlasStaking(7 days, 1 days, 5_000, 2_000);
        handler = new Handler(staking);
    }

    function targetContracts() public view returns (address[] memory t) {
        t = new address[](1);
        t[0] = address(handler);
    }

    function invariant_BalanceEqualsWhatIsOwed() public view {
        uint256 owed = staking.burned();
        for (uint256 i = 0; i < 3; ++i) {
            IAtlasStaking.Reputation memory r = staking.reputationOf(handler.actors(i));
            owed += r.stake + r.unbonding + r.claimable + r.pending;
        }
        for (uint256 k = 0; k < handler.runCount(); ++k) owed += staking.getRun(handler.runs(k)).budget;
        assertEq(address(staking).balance, owed, "balance == stakes + unbonding + budgets + claimable + pending + burned");
    }

    function invariant_NobodyTakesOutMoreThanPutInPlusCredited() public view {
        for (uint256 i = 0; i < 3; ++i) {
            address a = handler.actors(i);
            assertTrue(handler.tookOut(a) <= handler.putIn(a) + handler.credited(a), "took out more than was owed");
        }
    }
}

// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IAtlasStaking} from "../src/IAtlasStaking.sol";
import {Fixture, termsOf} from "./utils/Fixture.sol";

/// @dev Each test is an attack that worked on 186506a (shared/reviews/security-186506a.md), told as a story: the
///      honest setup from Fixture, the attacker's one move, and the promise that must still hold.
contract AtlasStakingAttacksTest is Fixture {
    address alt = address(0xA17); // a second address of the peer's owner

    function _equivocate(bytes32 runId, uint64 epoch) internal {
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, 11);
        a.runId = runId;
        b.runId = runId;
        bytes memory sa = _sign(PEER_KEY, a);
        bytes memory sb = _sign(PEER_KEY, b);
        vm.prank(alt);
        staking.slashConflictingReceipts(a, sa, b, sb, peer);
    }

    /// C1b: a peer reports itself from a second address to get its (unbonding) stake and unmatured rewards out now.
    function testFuzz_SelfSlashIsAlwaysALoss(uint8 reports, uint64 samples) public {
        reports = uint8(bound(reports, 1, 8));
        samples = uint64(bound(samples, 1, MAX_SAMPLES));
        _submit(_receipt(1000, samples)); // an immature reward the peer would like out early
        uint256 earned = uint256(samples) * RATE;
        vm.prank(peer);
        staking.requestUnstake(2 ether); // everything unbonding: 7 days away

        // A made-up run, or a run the peer opened itself without money, is not a run one can be slashed in.
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.UnknownRun.selector, keccak256("made up")));
        this.callSlash(keccak256("made up"), 0);
        vm.prank(peer);
        bytes32 own = staking.createRun(keccak256("own"), SPEC, termsOf(RATE, 0, MAX_SAMPLES));
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunNotFunded.selector, own));
        this.callSlash(own, 0);

        // In a funded run (its own, funded with 1 wei, or the real one) the report works, and it is a loss.
        vm.prank(peer);
        staking.fundRun{value: 1}(own);
        for (uint64 e = 0; e < reports; ++e) _equivocate(e % 2 == 0 ? own : RUN, e);
        vm.expectRevert(IAtlasStaking.NothingToClaim.selector);
        vm.prank(alt);
        staking.claim(); // nothing comes out before a challenge window, bounty included

        vm.warp(block.timestamp + UNBONDING);
        uint256 out;
        vm.prank(alt);
        staking.claim();
        out += alt.balance;
        uint256 before = peer.balance;
        vm.prank(peer);
        staking.withdraw();
        vm.prank(peer); // and whatever is left in its own run
        staking.closeRun(own);
        vm.warp(block.timestamp + WINDOW);
        vm.prank(peer);
        staking.reclaimBudget(own);
        out += peer.balance - before;
        uint256 putIn = 2 ether + 1;
        assertTrue(out < putIn, "the peer and its reporter together get back less than they put in");
        assertTrue(out < putIn + earned, "... and less than that plus what it earned");
        assertTrue(staking.burned() > 0, "most of each slash is burned");
    }

    function callSlash(bytes32 runId, uint64 epoch) external {
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, 11);
        a.runId = runId;
        b.runId = runId;
        staking.slashConflictingReceipts(a, _sign(PEER_KEY, a), b, _sign(PEER_KEY, b), peer);
    }

    /// H1: the attacker opens the public run tag first, the victim funds "the run", the attacker closes it.
    function test_SquatterCannotTakeTheRunOrItsFunding() public {
        address squatter = address(0x5A77E2);
        address victim = address(0x71C);
        vm.deal(squatter, 1 ether);
        vm.deal(victim, 10 ether);
        bytes32 tag = keccak256("victim-run-0123456789abcdef");
        vm.prank(squatter);
        bytes32 squatted = staking.createRun(tag, SPEC, termsOf(RATE, 0, MAX_SAMPLES));
        vm.prank(victim);
        bytes32 real = staking.createRun(tag, SPEC, termsOf(RATE, 0, MAX_SAMPLES)); // not blocked: the id names the trainer
        assertTrue(real != squatted, "two trainers, two runs");
        assertEq(real, staking.runIdOf(victim, tag), "the victim's run id is derived from the victim");
        vm.prank(victim);
        staking.fundRun{value: 5 ether}(real);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NotTrainer.selector, squatter, victim));
        vm.prank(squatter);
        staking.closeRun(real);
        assertEq(staking.getRun(real).budget, 5 ether, "the funding stays in the victim's run");
    }

    /// M5: someone relays one receipt of a pending batch alone, first; the batch must still land whole.
    function test_RelayedReceiptDoesNotSinkTheBatch() public {
        IAtlasStaking.Receipt[] memory rs = new IAtlasStaking.Receipt[](4);
        bytes[][] memory sigs = new bytes[][](4);
        for (uint64 i = 0; i < 4; ++i) {
            rs[i] = _receipt(5 + i, 100);
            sigs[i] = _sigs(rs[i]);
        }
        vm.prank(alt); // the front-runner
        staking.settleReceipt(rs[3], sigs[3]);
        vm.expectEmit(true, true, true, true);
        emit IAtlasStaking.ReceiptSettled(RUN, 8, staking.receiptDigest(rs[3]), 0, 0);
        staking.settleReceipts(rs, sigs);
        for (uint64 i = 0; i < 4; ++i) assertTrue(staking.paidFor(RUN, peer, 5 + i), "every receipt settled");
        assertEq(staking.reputationOf(peer).pending, 400 * uint256(RATE), "each paid exactly once");
    }

    /// M6: a stranger registers the victim's public PeerID first; the victim must still be able to bind and earn.
    function test_ThirdPartyCannotLockAPeerId() public {
        uint256 victimKey = 0x71C71C;
        address victim = vm.addr(victimKey);
        bytes32 victimPeerId = keccak256("QmVictim");
        vm.prank(alt);
        staking.registerPeer(victimPeerId); // the squat
        vm.deal(victim, 2 ether);
        vm.startPrank(victim);
        staking.stake{value: 1 ether}();
        staking.registerPeer(victimPeerId);
        vm.stopPrank();
        assertEq(staking.peerIdOf(victim), victimPeerId, "bound");
        IAtlasStaking.Receipt memory r = _receipt(0, 0); // the mate's receipt with the victim in the peer's place
        uint256 v = r.members[0].wallet == peer ? 0 : 1;
        r.members[v] = IAtlasStaking.Member(victim, victimPeerId, 7, false);
        if (r.members[0].wallet > r.members[1].wallet) (r.members[0], r.members[1]) = (r.members[1], r.members[0]);
        bytes[] memory sigs = new bytes[](2);
        for (uint256 i = 0; i < 2; ++i) sigs[i] = _sign(r.members[i].wallet == victim ? victimKey : MATE_KEY, r);
        staking.settleReceipt(r, sigs);
        assertEq(staking.reputationOf(victim).pending, 7 * uint256(RATE), "the victim is paid");
    }

    /// M7: the trainer closes while receipts sit in peers' outboxes; they are still paid for a challenge window.
    function testFuzz_ReceiptsQueuedAtCloseArePaidForAWindow(uint256 delay) public {
        delay = bound(delay, 0, WINDOW - 1);
        IAtlasStaking.Receipt memory r = _receipt(3, 50);
        bytes[] memory sigs = _sigs(r);
        vm.prank(trainer);
        staking.closeRun(RUN);
        vm.warp(block.timestamp + delay);
        vm.expectRevert(); // the trainer cannot take the budget while receipts may still come
        vm.prank(trainer);
        staking.reclaimBudget(RUN);
        staking.settleReceipt(r, sigs);
        assertEq(staking.reputationOf(peer).pending, 50 * uint256(RATE), "paid after the close");
    }
}

// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AtlasStaking} from "../src/AtlasStaking.sol";
import {IAtlasStaking} from "../src/IAtlasStaking.sol";
import {Fixture, termsOf} from "./utils/Fixture.sol";

/// @dev Rejects ether, or re-enters claim() (or withdraw()) when paid.
contract Payee {
    AtlasStaking internal immutable staking;
    bool internal reenter;
    bool internal viaWithdraw;

    constructor(AtlasStaking s, bool reenter_) {
        staking = s;
        reenter = reenter_;
    }

    function stakeAndUnstake() external payable {
        staking.stake{value: msg.value}();
        staking.requestUnstake(msg.value);
        viaWithdraw = true;
    }

    function withdraw() external {
        staking.withdraw();
    }

    function slash(IAtlasStaking.Receipt calldata a, bytes calldata sa, IAtlasStaking.Receipt calldata b,
        bytes calldata sb, address who) external {
        staking.slashConflictingReceipts(a, sa, b, sb, who);
    }

    function claim() external {
        staking.claim();
    }

    receive() external payable {
        if (!reenter) revert("no ether");
        if (viaWithdraw) staking.withdraw();
        else staking.claim();
    }
}

contract AtlasStakingTest is Fixture {
    // ------------------------------------------------------------ happy paths
    function testFuzz_RewardsEqualSamplesTimesRateAndMatureAfterWindow(uint64 s1, uint64 s2, uint256 wait) public {
        s1 = uint64(bound(s1, 1, MAX_SAMPLES));
        s2 = uint64(bound(s2, 1, MAX_SAMPLES));
        _submit(_receipt(0, s1));
        _submit(_receipt(1, s2));
        IAtlasStaking.Reputation memory r = staking.reputationOf(peer);
        uint256 expected = (uint256(s1) + s2) * RATE;
        assertEq(r.pending, expected, "pending");
        assertEq(r.claimable, 0, "claimable before window");
        assertEq(r.verifiedSamples, uint256(s1) + s2, "samples");
        assertEq(r.epochsContributed, 2, "epochs");
        assertEq(staking.getRun(RUN).budget, 10 ether - expected, "budget");

        // Less than one full window later nothing is claimable; two windows later all of it is.
        wait = bound(wait, 0, WINDOW - 1);
        vm.warp(block.timestamp + wait);
        assertEq(staking.reputationOf(peer).claimable, 0, "claimable inside window");
        vm.expectRevert(IAtlasStaking.NothingToClaim.selector); // claim before the window
        vm.prank(peer);
        staking.claim();
        vm.warp(block.timestamp + 2 * uint256(WINDOW));
        uint256 before = peer.balance;
        vm.prank(peer);
        staking.claim();
        assertEq(peer.balance - before, expected, "claimed");
        vm.expectRevert(IAtlasStaking.NothingToClaim.selector); // double claim
        vm.prank(peer);
        staking.claim();
    }

    function testFuzz_ReentrantWithdrawGetsNothingExtra(uint256 amount) public {
        amount = bound(amount, 1, 10 ether);
        Payee attacker = new Payee(staking, true);
        vm.deal(address(this), amount);
        attacker.stakeAndUnstake{value: amount}();
        vm.warp(block.timestamp + UNBONDING);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.TransferFailed.selector, address(attacker), amount));
        attacker.withdraw(); // re-entering withdraw() inside receive() hits the guard: the payout reverts whole
        assertEq(staking.reputationOf(address(attacker)).unbonding, amount, "still there, paid once at most");
    }

    function testFuzz_BatchOfEpochs(uint8 n) public {
        n = uint8(bound(n, 1, 16));
        IAtlasStaking.Receipt[] memory rs = new IAtlasStaking.Receipt[](n);
        bytes[][] memory sigs = new bytes[][](n);
        for (uint64 i = 0; i < n; ++i) {
            rs[i] = _receipt(i, 100 + i);
            sigs[i] = _sigs(rs[i]);
        }
        vm.prank(reporter); // anyone may relay
        staking.settleReceipts(rs, sigs);
        assertEq(staking.reputationOf(peer).epochsContributed, n, "epochs");
        assertTrue(staking.paidFor(RUN, peer, n - 1), "last epoch marked");
    }

    function testFuzz_UnstakeThenWithdraw(uint256 amount) public {
        amount = bound(amount, 1, 2 ether);
        vm.prank(peer);
        staking.requestUnstake(amount);
        vm.warp(block.timestamp + UNBONDING);
        uint256 before = peer.balance;
        vm.prank(peer);
        staking.withdraw();
        assertEq(peer.balance - before, amount, "withdrawn");
        assertEq(staking.reputationOf(peer).stake, 2 ether - amount, "stake left");
    }

    function testFuzz_EquivocationSlashesStakeAndPaysBounty(uint64 epoch, uint64 samplesB) public {
        epoch = uint64(bound(epoch, 0, EPOCHS));
        samplesB = uint64(bound(samplesB, 1, MAX_SAMPLES));
        vm.assume(samplesB != 10);
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, samplesB);
        _submit(a); // its reward (pending) is forfeited by the slash
        bytes memory sa = _sign(PEER_KEY, a);
        bytes memory sb = _sign(PEER_KEY, b);
        vm.prank(reporter);
        staking.slashConflictingReceipts(a, sa, b, sb, peer);
        IAtlasStaking.Reputation memory r = staking.reputationOf(peer);
        assertEq(r.stake, 1 ether, "half the stake is gone");
        assertEq(r.timesSlashed, 1, "counted");
        assertEq(r.pending, 0, "pending rewards forfeited");
        assertEq(staking.reputationOf(reporter).pending, 0.2 ether, "bounty = 20% of 1 ether, inside its window");
        vm.warp(block.timestamp + 2 * uint256(WINDOW));
        vm.prank(reporter);
        staking.claim();
        assertEq(reporter.balance, 0.2 ether, "bounty paid after the window");
        assertEq(staking.burned(), 0.8 ether + 10 * uint256(RATE), "rest and forfeited reward burned");
        assertEq(staking.getRun(RUN).budget, 10 ether - 10 * uint256(RATE), "budget only paid the receipt");
        assertEq(address(staking).balance, 1 ether + 2 ether + staking.getRun(RUN).budget + staking.burned(),
            "conserved (peer's and mate's stakes)");
    }

    function testFuzz_SlashReachesUnbondingStake(uint256 unstake) public {
        unstake = bound(unstake, 1, 2 ether);
        vm.prank(peer);
        staking.requestUnstake(unstake);
        IAtlasStaking.Receipt memory a = _receipt(3, 10);
        IAtlasStaking.Receipt memory b = _receipt(3, 11);
        staking.slashConflictingReceipts(a, _sign(PEER_KEY, a), b, _sign(PEER_KEY, b), peer);
        IAtlasStaking.Reputation memory r = staking.reputationOf(peer);
        assertEq(r.stake + r.unbonding, 1 ether, "half of active + unbonding");
    }

    function testFuzz_ReentrantClaimGetsNothingExtra(uint64 epoch) public {
        Payee attacker = new Payee(staking, true);
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, 11);
        attacker.slash(a, _sign(PEER_KEY, a), b, _sign(PEER_KEY, b), peer);
        vm.warp(block.timestamp + 2 * uint256(WINDOW)); // the bounty matures like a reward
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.TransferFailed.selector, address(attacker), 0.2 ether));
        attacker.claim(); // re-entering claim() inside receive() hits the guard, so the whole payout reverts
    }

    function test_CloseRunRefundsUnspentBudgetAfterItsWindow() public {
        _submit(_receipt(0, 1000));
        vm.prank(trainer);
        staking.closeRun(RUN);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunStillClosing.selector, RUN,
            uint32(block.timestamp + WINDOW)));
        vm.prank(trainer);
        staking.reclaimBudget(RUN);
        vm.warp(block.timestamp + WINDOW);
        uint256 before = trainer.balance;
        vm.prank(trainer);
        staking.reclaimBudget(RUN);
        assertEq(trainer.balance - before, 10 ether - 1000 * uint256(RATE), "refund");
    }

    // ------------------------------------------------------------ revert paths
    function testFuzz_RevertConstructorParams(uint32 unbonding, uint32 window, uint16 slash, uint16 bounty) public {
        bool bad = window == 0 || unbonding < 2 * uint256(window) || slash == 0 || slash > 10_000 || bounty > 10_000;
        if (bad) vm.expectRevert(IAtlasStaking.InvalidParameters.selector);
        new AtlasStaking(unbonding, window, slash, bounty);
    }

    function testFuzz_RevertStakeZero(address who) public {
        vm.expectRevert(IAtlasStaking.ZeroAmount.selector);
        vm.prank(who);
        staking.stake{value: 0}();
    }

    function testFuzz_RevertUnstakeTooMuch(uint256 amount) public {
        amount = bound(amount, 2 ether + 1, type(uint128).max);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InsufficientStake.selector, 2 ether, amount));
        vm.prank(peer);
        staking.requestUnstake(amount);
    }

    function testFuzz_RevertUnstakeZero(address who) public {
        vm.expectRevert(IAtlasStaking.ZeroAmount.selector);
        vm.prank(who);
        staking.requestUnstake(0);
    }

    function testFuzz_RevertWithdrawEarly(uint256 wait) public {
        wait = bound(wait, 0, UNBONDING - 1);
        vm.prank(peer);
        staking.requestUnstake(1 ether);
        uint64 readyAt = uint64(block.timestamp + UNBONDING);
        vm.warp(block.timestamp + wait);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.UnbondingNotOver.selector, readyAt));
        vm.prank(peer);
        staking.withdraw();
    }

    function testFuzz_RevertWithdrawNothing(address who) public {
        vm.assume(who != peer);
        vm.expectRevert(IAtlasStaking.NothingToWithdraw.selector);
        vm.prank(who);
        staking.withdraw();
    }

    function testFuzz_RevertRegisterTwice(address other, bytes32 otherId) public {
        vm.assume(other != peer && other != address(0) && otherId != bytes32(0) && otherId != PEER_ID);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.AlreadyRegistered.selector, peer, PEER_ID));
        vm.prank(peer);
        staking.registerPeer(otherId);
        vm.expectRevert(IAtlasStaking.InvalidParameters.selector);
        vm.prank(other);
        staking.registerPeer(bytes32(0));
    }

    function testFuzz_RevertCreateRunExistsOrInvalid(bytes32 runId) public {
        vm.assume(runId != TAG && runId != bytes32(0));
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunExists.selector, RUN));
        vm.prank(trainer);
        staking.createRun(TAG, SPEC, termsOf(RATE, MIN_STAKE, MAX_SAMPLES));
        vm.expectRevert(IAtlasStaking.InvalidParameters.selector);
        staking.createRun(runId, SPEC, termsOf(RATE, MIN_STAKE, 0));
        vm.expectRevert(IAtlasStaking.InvalidParameters.selector);
        staking.createRun(bytes32(0), SPEC, termsOf(RATE, MIN_STAKE, MAX_SAMPLES));
    }

    function testFuzz_RevertFundOrCloseUnknownRun(bytes32 runId) public {
        vm.assume(runId != RUN);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.UnknownRun.selector, runId));
        staking.fundRun{value: 1}(runId);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.UnknownRun.selector, runId));
        staking.closeRun(runId);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.UnknownRun.selector, runId));
        staking.reclaimBudget(runId);
        vm.expectRevert(IAtlasStaking.ZeroAmount.selector);
        staking.fundRun{value: 0}(RUN);
    }

    function testFuzz_RevertCloseByNonTrainer(address who) public {
        vm.assume(who != trainer);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NotTrainer.selector, who, trainer));
        vm.prank(who);
        staking.closeRun(RUN);
    }

    function testFuzz_RevertReceiptOnClosedRun(uint64 epoch) public {
        epoch = uint64(bound(epoch, 0, EPOCHS));
        vm.prank(trainer);
        staking.closeRun(RUN);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunClosed.selector, RUN));
        staking.fundRun{value: 1}(RUN); // no new money into a closing run
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunClosed.selector, RUN));
        vm.prank(trainer);
        staking.closeRun(RUN); // closing twice does not move the deadline
        vm.warp(block.timestamp + WINDOW);
        IAtlasStaking.Receipt memory r = _receipt(epoch, 1);
        bytes[] memory sigs = _sigs(r);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.RunClosed.selector, RUN));
        staking.settleReceipt(r, sigs);
    }

    function testFuzz_RevertBudgetExhausted(uint128 rate) public {
        rate = uint128(bound(rate, 10 ether / MAX_SAMPLES + 1, 1e30));
        vm.prank(trainer);
        bytes32 run2 = staking.createRun{value: 10 ether}(keccak256("expensive"), SPEC, termsOf(rate, 0, MAX_SAMPLES));
        IAtlasStaking.Receipt memory r = _receipt(0, MAX_SAMPLES);
        r.runId = run2;
        bytes[] memory sigs = _sigs(r);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.BudgetExhausted.selector, run2, 10 ether,
            uint256(MAX_SAMPLES) * rate));
        staking.settleReceipt(r, sigs);
    }

    function testFuzz_RevertBatchIsAtomic(uint8 bad) public {
        bad = uint8(bound(bad, 0, 3));
        IAtlasStaking.Receipt[] memory rs = new IAtlasStaking.Receipt[](4);
        bytes[][] memory sigs = new bytes[][](4);
        for (uint64 i = 0; i < 4; ++i) {
            rs[i] = _receipt(i, 5);
            sigs[i] = _sigs(rs[i]);
        }
        sigs[bad][0] = ""; // one receipt of the batch has a single signature of two: no majority
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NoQuorum.selector, 1, 2));
        staking.settleReceipts(rs, sigs);
        assertEq(staking.reputationOf(peer).epochsContributed, 0, "nothing recorded");
    }

    function testFuzz_RevertNotEquivocation(uint64 e1, uint64 e2) public {
        IAtlasStaking.Receipt memory a = _receipt(e1, 10);
        bytes memory sa = _sign(PEER_KEY, a);
        vm.expectRevert(IAtlasStaking.NotEquivocation.selector);
        staking.slashConflictingReceipts(a, sa, a, sa, peer); // the same receipt twice
        vm.assume(e1 != e2);
        IAtlasStaking.Receipt memory b = _receipt(e2, 11);
        bytes memory sb = _sign(PEER_KEY, b);
        vm.expectRevert(IAtlasStaking.NotEquivocation.selector);
        staking.slashConflictingReceipts(a, sa, b, sb, peer); // different epochs are not a conflict
    }

    function testFuzz_RevertSlashForgedSignature(uint256 key) public {
        key = bound(key, 1, 2 ** 128);
        vm.assume(key != PEER_KEY);
        IAtlasStaking.Receipt memory a = _receipt(1, 10);
        IAtlasStaking.Receipt memory b = _receipt(1, 11);
        bytes memory sa = _sign(PEER_KEY, a);
        bytes memory forged = _sign(key, b);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.InvalidSigner.selector, vm.addr(key), peer));
        staking.slashConflictingReceipts(a, sa, b, forged, peer);
    }

    function testFuzz_RevertSlashTwiceOrNothing(uint64 epoch) public {
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, 11);
        IAtlasStaking.Receipt memory c = _receipt(epoch, 12);
        bytes memory sa = _sign(PEER_KEY, a);
        staking.slashConflictingReceipts(a, sa, b, _sign(PEER_KEY, b), peer);
        bytes memory sc = _sign(PEER_KEY, c);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.AlreadySlashed.selector, RUN, epoch, peer));
        staking.slashConflictingReceipts(a, sa, c, sc, peer);

        uint256 key = 0xCAFE; // signed two receipts, but has no stake
        address nobody = vm.addr(key);
        bytes memory sx = _sign(key, a);
        bytes memory sy = _sign(key, b);
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.NothingToSlash.selector, nobody));
        staking.slashConflictingReceipts(a, sx, b, sy, nobody);
    }

    function testFuzz_RevertNothingToClaim(address who) public {
        vm.expectRevert(IAtlasStaking.NothingToClaim.selector);
        vm.prank(who);
        staking.claim();
    }

    function testFuzz_RevertTransferToRejectingReceiver(uint64 epoch) public {
        Payee rejecting = new Payee(staking, false);
        IAtlasStaking.Receipt memory a = _receipt(epoch, 10);
        IAtlasStaking.Receipt memory b = _receipt(epoch, 11);
        rejecting.slash(a, _sign(PEER_KEY, a), b, _sign(PEER_KEY, b), peer);
        vm.warp(block.timestamp + 2 * uint256(WINDOW));
        vm.expectRevert(abi.encodeWithSelector(IAtlasStaking.TransferFailed.selector, address(rejecting), 0.2 ether));
        rejecting.claim();
    }
}

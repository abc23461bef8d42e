// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AtlasStaking} from "../../src/AtlasStaking.sol";
import {IAtlasStaking} from "../../src/IAtlasStaking.sol";
import {TestBase} from "./Vm.sol";

/// @dev Run terms for tests that are not about the per-epoch budget or pace: a large epoch budget, 1 s epochs.
function termsOf(uint128 rate, uint128 minStake, uint64 maxSamples) pure returns (IAtlasStaking.RunTerms memory) {
    return IAtlasStaking.RunTerms({rewardPerSample: rate, minStake: minStake, maxSamplesPerEpoch: maxSamples,
        samplesPerEpoch: 1 << 40, minEpochSeconds: 1});
}

/// @dev One run (10 ether budget, 1 s epochs) opened by `trainer`, a staked and registered `peer` and its groupmate
///      `mate`, and receipt helpers: `_receipt(epoch, samples)` is the pair's receipt in which only `peer` has weight.
abstract contract Fixture is TestBase {
    uint32 constant UNBONDING = 7 days;
    uint32 constant WINDOW = 1 days;
    bytes32 constant TAG = keccak256("minilm-topics-0123456789abcdef");
    bytes32 RUN; // runIdOf(trainer, TAG)
    bytes32 constant SPEC = keccak256("spec"); // not sha256: a precompile call would consume vm.prank
    uint128 constant RATE = 1e12;
    uint128 constant MIN_STAKE = 1 ether;
    uint64 constant MAX_SAMPLES = 1024;
    uint64 constant EPOCHS = 100_000; // epochs 0..EPOCHS are payable after setUp

    AtlasStaking staking;
    uint256 constant PEER_KEY = 0xA11CE;
    uint256 constant MATE_KEY = 0xB0B;
    address peer;
    address mate;
    bytes32 constant PEER_ID = keccak256("QmPeer");
    bytes32 constant MATE_ID = keccak256("QmMate");
    address trainer = address(0x7EA);
    address reporter = address(0xBEEF);

    function setUp() public {
        vm.warp(1_700_000_000);
        staking = new AtlasStaking(UNBONDING, WINDOW, 5_000, 2_000);
        peer = vm.addr(PEER_KEY);
        mate = vm.addr(MATE_KEY);
        vm.deal(trainer, 100 ether);
        vm.prank(trainer);
        RUN = staking.createRun{value: 10 ether}(TAG, SPEC, termsOf(RATE, MIN_STAKE, MAX_SAMPLES));
        _join(peer, PEER_ID);
        _join(mate, MATE_ID);
        vm.warp(block.timestamp + EPOCHS);
    }

    // ---------------------------------------------------------------- helpers
    function _join(address who, bytes32 id) internal {
        vm.deal(who, 100 ether);
        vm.startPrank(who);
        staking.stake{value: 2 ether}();
        staking.registerPeer(id);
        vm.stopPrank();
    }

    /// @dev The receipt of the pair (peer, mate) for `epoch` in `RUN`: the peer's weight `samples`, the mate's 0.
    function _receipt(uint64 epoch, uint64 samples) internal view returns (IAtlasStaking.Receipt memory r) {
        r.runId = RUN;
        r.epoch = epoch;
        r.resultHash = keccak256(abi.encode("aggregate", epoch));
        r.members = new IAtlasStaking.Member[](2);
        IAtlasStaking.Member memory a = IAtlasStaking.Member(peer, PEER_ID, samples, false);
        IAtlasStaking.Member memory b = IAtlasStaking.Member(mate, MATE_ID, 0, false);
        (r.members[0], r.members[1]) = peer < mate ? (a, b) : (b, a);
    }

    function _sign(uint256 key, IAtlasStaking.Receipt memory r) internal returns (bytes memory) {
        (uint8 v, bytes32 rr, bytes32 ss) = vm.sign(key, staking.receiptDigest(r));
        return abi.encodePacked(rr, ss, v);
    }

    /// @dev Both members' signatures, in member order.
    function _sigs(IAtlasStaking.Receipt memory r) internal returns (bytes[] memory sigs) {
        sigs = new bytes[](2);
        (sigs[0], sigs[1]) = peer < mate ? (_sign(PEER_KEY, r), _sign(MATE_KEY, r)) : (_sign(MATE_KEY, r), _sign(PEER_KEY, r));
    }

    function _submit(IAtlasStaking.Receipt memory r) internal {
        staking.settleReceipt(r, _sigs(r));
    }
}

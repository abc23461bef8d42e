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

/// @dev One run (10 ether budget) opened by `trainer`, one staked and registered `peer`, and proof helpers.
abstract contract Fixture is TestBase {
    uint32 constant UNBONDING = 7 days;
    uint32 constant WINDOW = 1 days;
    bytes32 constant TAG = keccak256("minilm-topics-0123456789abcdef");
    bytes32 RUN; // runIdOf(trainer, TAG)
    bytes32 constant SPEC = keccak256("spec"); // not sha256: a precompile call would consume vm.prank
    uint128 constant RATE = 1e12;
    uint128 constant MIN_STAKE = 1 ether;
    uint64 constant MAX_SAMPLES = 1024;

    AtlasStaking staking;
    uint256 constant PEER_KEY = 0xA11CE;
    address peer;
    bytes32 constant PEER_ID = keccak256("QmPeer");
    address trainer = address(0x7EA);
    address reporter = address(0xBEEF);

    function setUp() public {
        vm.warp(1_700_000_000);
        staking = new AtlasStaking(UNBONDING, WINDOW, 5_000, 2_000);
        peer = vm.addr(PEER_KEY);
        vm.deal(peer, 100 ether);
        vm.deal(trainer, 100 ether);
        vm.prank(trainer);
        RUN = staking.createRun{value: 10 ether}(TAG, SPEC, termsOf(RATE, MIN_STAKE, MAX_SAMPLES));
        vm.startPrank(peer);
        staking.stake{value: 2 ether}();
        staking.registerPeer(PEER_ID);
        vm.stopPrank();
    }

    // ---------------------------------------------------------------- helpers
    function _proof(uint64 epoch, uint64 samples) internal view returns (IAtlasStaking.Proof memory) {
        return IAtlasStaking.Proof({
            runId: RUN,
            epoch: epoch,
            peer: peer,
            peerIdHash: PEER_ID,
            samples: samples,
            adapterHash: keccak256(abi.encode("adapter", epoch)),
            dataRoot: keccak256(abi.encode("data", epoch)),
            deadline: uint64(block.timestamp + 1 hours)
        });
    }

    function _sign(uint256 key, IAtlasStaking.Proof memory p) internal returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, staking.proofDigest(p));
        return abi.encodePacked(r, s, v);
    }

    function _submit(IAtlasStaking.Proof memory p) internal {
        staking.submitProof(p, _sign(PEER_KEY, p));
    }

}

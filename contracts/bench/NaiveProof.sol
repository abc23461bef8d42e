// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title NaiveProof
/// @notice The baseline scripts/bench_gas.py measures AtlasStaking against, in the same run: each peer posts its own
///         EIP-712 claim for each epoch in its own transaction, checked and paid one by one (what atlas-swarm did
///         before co-signed receipts, less the stake and binding checks). Not deployed anywhere; benchmark only.
contract NaiveProof is EIP712 {
    struct Proof {
        bytes32 runId;
        uint64 epoch;
        address peer;
        uint64 samples;
        bytes32 adapterHash;
    }

    bytes32 public constant PROOF_TYPEHASH =
        keccak256("Proof(bytes32 runId,uint64 epoch,address peer,uint64 samples,bytes32 adapterHash)");
    uint256 public constant RATE = 1e9;
    mapping(bytes32 => bool) public submitted;
    mapping(address => uint256) public rewards;
    mapping(address => uint256) public samplesOf;
    uint256 public budget;

    event ProofAccepted(bytes32 indexed runId, uint64 indexed epoch, address indexed peer, uint64 samples);

    error InvalidSigner();
    error AlreadySubmitted();

    constructor() payable EIP712("NaiveProof", "1") {
        budget = msg.value;
    }

    function proofDigest(Proof calldata p) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(PROOF_TYPEHASH, p.runId, p.epoch, p.peer, p.samples,
            p.adapterHash)));
    }

    function submit(Proof calldata p, bytes calldata signature) external {
        if (ECDSA.recover(proofDigest(p), signature) != p.peer) revert InvalidSigner();
        bytes32 key = keccak256(abi.encode(p.runId, p.peer, p.epoch));
        if (submitted[key]) revert AlreadySubmitted();
        submitted[key] = true;
        uint256 reward = uint256(p.samples) * RATE;
        budget -= reward;
        rewards[p.peer] += reward;
        samplesOf[p.peer] += p.samples;
        emit ProofAccepted(p.runId, p.epoch, p.peer, p.samples);
    }
}

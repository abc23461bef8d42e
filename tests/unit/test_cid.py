"""CIDs computed locally: known vectors (no daemon needed)."""

from atlas_swarm.storage import cid_of_bytes, cid_of_file


def test_known_cids():
    assert cid_of_bytes(b"") == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"  # `ipfs add` of an empty file
    assert cid_of_bytes(b"hello world\n") == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert cid_of_bytes(b"", version=1) == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_file_and_bytes_agree_across_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 2049  # 524,544 bytes: two full chunks and a partial one
    (tmp_path / "f").write_bytes(data)
    for version in (0, 1):
        assert cid_of_file(tmp_path / "f", version) == cid_of_bytes(data, version)

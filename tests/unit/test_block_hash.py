from rtpllm.kvcache.block_hash import block_keys, chain_key, extend_block_keys, namespace_key

NS = namespace_key("m", "float32", 4)


def test_keys_are_chained_and_deterministic() -> None:
    tokens = list(range(10))
    keys = block_keys(tokens, 4, NS)
    assert len(keys) == 2  # the partial third block has no key
    assert keys[0] == chain_key(NS, [0, 1, 2, 3])
    assert keys[1] == chain_key(keys[0], [4, 5, 6, 7])
    assert block_keys(tokens, 4, NS) == keys


def test_same_block_different_prefix_differs() -> None:
    a = block_keys([1, 2, 3, 4, 9, 9, 9, 9], 4, NS)
    b = block_keys([5, 6, 7, 8, 9, 9, 9, 9], 4, NS)
    assert a[1] != b[1]


def test_namespace_separates_models_and_formats() -> None:
    tokens = [1, 2, 3, 4]
    keys = {
        block_keys(tokens, 4, namespace_key("m", "float32", 4))[0],
        block_keys(tokens, 4, namespace_key("other", "float32", 4))[0],
        block_keys(tokens, 4, namespace_key("m", "bfloat16", 4))[0],
        block_keys(tokens, 4, namespace_key("m", "float32", 4, kv_format="fp8"))[0],
        block_keys(tokens, 4, namespace_key("m", "float32", 4, tp_size=2))[0],
    }
    assert len(keys) == 5


def test_extras_change_the_key() -> None:
    assert chain_key(NS, [1, 2]) != chain_key(NS, [1, 2], b"image:abc@0")


def test_extend_continues_where_it_stopped() -> None:
    tokens = list(range(13))
    partial = extend_block_keys([], tokens[:6], 4, NS)
    assert extend_block_keys(partial, tokens, 4, NS) == block_keys(tokens, 4, NS)


def test_key_is_stable_across_processes() -> None:
    # Fixed vector: a change here breaks every cached block in every tier and host.
    assert chain_key(namespace_key("m", "float32", 4), [1, 2, 3, 4]).hex() == GOLDEN


GOLDEN = "4a82035a37fb4d1584d78e055b3eb6ff"

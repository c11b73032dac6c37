"""The generator runs over the model's stacked layer-group weights: no copy of them, a traced program whose size
does not depend on the depth, and a stacked cache whose per-layer view keeps the documented shapes."""

import gc

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import LIGHTNING, tiny
from minimax_jax.infer import Generator
from minimax_jax.infer.forward import forward_chunk, split_for_inference
from minimax_jax.model.cache import KVCache, LightningCache, create_cache
from minimax_jax.model.transformer import MiniMaxForCausalLM


def _config(groups: int):
    config = tiny()
    return config.replace(num_hidden_layers=groups * config.layer_group_size,
                          attn_type_list=config.group_pattern * groups)


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def _equations(jaxpr) -> int:
    """Equations of ``jaxpr`` and of every jaxpr nested in it (scan and loop bodies, jitted calls)."""
    return sum(1 + sum(_equations(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def test_generator_shares_the_model_arrays():
    model = MiniMaxForCausalLM(_config(2), rngs=nnx.Rngs(0))
    before = _live_bytes()
    generator = Generator(model, max_length=32, kv_block=8)
    assert _live_bytes() == before  # no second copy of any weight
    model_arrays = {id(a) for a in jax.tree.leaves(nnx.state(model))}
    assert all(id(a) in model_arrays for a in jax.tree.leaves(generator.weights))


def test_decode_program_size_does_not_grow_with_depth():
    sizes = []
    for groups in (2, 4):
        model = MiniMaxForCausalLM(_config(groups), rngs=nnx.Rngs(0))
        graph, weights = split_for_inference(model)
        cache = create_cache(model.config, np.zeros(2, np.int32), 16)
        step = jax.make_jaxpr(lambda w, c, ids, graph=graph: forward_chunk(graph, w, c, ids, kv_block=None,
                                                                          all_logits=True))
        sizes.append(_equations(step(weights, cache, jnp.zeros((2, 1), jnp.int32)).jaxpr))
    assert sizes[0] == sizes[1], sizes


def test_per_layer_view_of_the_stacked_cache():
    config = _config(2)
    cache = create_cache(config, np.asarray([0, 3], np.int32), 16)
    assert cache.capacity == 16
    for layer, attn_type in enumerate(config.attn_type_list):
        entry = cache.layer(layer)
        if attn_type == LIGHTNING:
            assert isinstance(entry, LightningCache)
            assert entry.state.shape == (2, config.num_attention_heads, config.head_dim, config.head_dim)
            assert entry.state.dtype == jnp.float32
        else:
            assert isinstance(entry, KVCache)
            assert entry.keys.shape == entry.values.shape == (2, 16, config.num_key_value_heads, config.head_dim)

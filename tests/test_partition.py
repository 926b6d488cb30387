import pytest

from tpi_mpi.errors import UserError
from tpi_mpi.weights.partition import largest_remainder, plan_shards


def test_largest_remainder_sums_and_prefers_lower_rank_on_ties() -> None:
    assert largest_remainder(5, [0.5, 0.5]) == [3, 2]
    assert largest_remainder(5, [1 / 3] * 3) == [2, 2, 1]
    assert largest_remainder(10, [0.4, 0.2, 0.2, 0.2]) == [4, 2, 2, 2]
    assert sum(largest_remainder(11008, [0.37, 0.21, 0.42])) == 11008


def test_plan_keeps_query_heads_with_their_kv_head() -> None:
    plan = plan_shards(num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672,
                       world_size=3, ratios=[0.5, 0.25, 0.25])
    assert plan.kv_heads == ((0, 4), (4, 6), (6, 8))
    assert plan.q_heads == ((0, 32), (32, 48), (48, 64))
    assert plan.ffn_columns == ((0, 14336), (14336, 21504), (21504, 28672))


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=3, ratios=[0.5, 0.5]), "2 ratios given for a world size of 3"),
    (dict(world_size=2, ratios=[0.7, 0.4]), "must sum to 1"),
    (dict(world_size=2, ratios=[1.2, -0.2]), "must all be positive"),
    (dict(world_size=2, ratios=[0.9, 0.1]), "leave rank 1 without a KV head"),
    (dict(world_size=5), "exceeds the model's 4 KV heads"),
    (dict(world_size=0), "at least 1"),
])
def test_bad_ratios_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan_shards(num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=100, **kwargs)

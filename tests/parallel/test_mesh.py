"""The rank layout: world = PP x DP x CP, CP innermost, stages outermost, EP groups inside a stage."""

import pytest

from kmodel.config import load_config
from kmodel.parallel.mesh import KINDS, Coords, Mesh


@pytest.mark.parametrize("world, cp, pp, ep", [(1, 1, 1, 1), (8, 2, 2, 2), (16, 2, 2, 4), (12, 3, 1, 4), (8, 1, 4, 2)])
def test_groups_partition_the_world_and_agree_with_the_coordinates(world, cp, pp, ep):
    mesh = Mesh(world, cp, pp, ep)
    for kind in KINDS:
        ranks = sorted(r for group in mesh.groups(kind) for r in group)
        assert ranks == list(range(world)), kind
    for r in range(world):
        c = mesh.coords(r)
        assert mesh.rank(c.stage, c.data, c.context) == r
        assert all(mesh.coords(o).stage == c.stage and mesh.coords(o).data == c.data for o in mesh.group_of("context", r))
        assert all(mesh.coords(o).stage == c.stage and mesh.coords(o).context == c.context for o in mesh.group_of("data", r))
        assert [mesh.coords(o).stage for o in mesh.group_of("pipeline", r)] == list(range(pp))
        assert len(mesh.group_of("expert", r)) == ep and len(mesh.group_of("expert_data", r)) == world // pp // ep
        assert all(mesh.coords(o).stage == c.stage for o in mesh.group_of("expert", r) + mesh.group_of("expert_data", r))


def test_layout_of_a_known_mesh():
    """8 ranks, CP 2, PP 2 (DP 2), EP 2: consecutive ranks share a sequence; stage 1 is ranks 4-7."""
    mesh = Mesh(8, context=2, pipeline=2, expert=2)
    assert mesh.groups("context") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.groups("pipeline") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.groups("expert") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # an EP group spans the CP ranks
    assert mesh.groups("expert_data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.coords(6) == Coords(stage=1, data=1, context=0, expert=0)


def test_mesh_from_the_recipe_and_its_refusals():
    cfg = load_config("recipes/tiny-ko-moe.yaml", ["parallel.backend=deepspeed", "parallel.world_size=8",
                                                   "parallel.context_parallel_size=2", "parallel.pipeline_parallel_size=2",
                                                   "parallel.expert_parallel_size=2", "parallel.zero_stage=1"])
    assert Mesh.from_config(cfg.parallel) == Mesh(8, 2, 2, 2) and cfg.parallel.data_parallel_size == 2
    with pytest.raises(ValueError, match=r"context \(3\) x pipeline \(1\) does not divide world \(8\)"):
        Mesh(8, context=3)
    with pytest.raises(ValueError, match=r"expert parallel size \(4\) does not divide the 2 ranks of a stage"):
        Mesh(8, context=1, pipeline=4, expert=4)
    with pytest.raises(ValueError, match="rank 8 is outside"):
        Mesh(8).coords(8)

"""Dist's collectives on 2 real gloo processes with unequal shards (a skipped video or a Knapsack
budget leaves ranks with different row counts): the gathered rows are exactly every rank's rows
in rank order, with no padding row left in."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmrl.train.distributed import Dist

ROWS = {0: 3, 1: 1}  # rank 1 has fewer rows: its shard is padded for the collective


def _rows(rank: int) -> torch.Tensor:
    n = ROWS[rank]  # [n, 2] values that name their rank and row
    return torch.tensor([[10.0 * rank + i, -(10.0 * rank + i)] for i in range(n)])


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        d = Dist(rank, 2, rank)
        rows = d.all_gather_rows(_rows(rank))
        total = d.all_reduce_sum(torch.tensor([float(rank + 1)]))
        torch.save({"rows": rows, "total": total, "objects": d.all_gather_object(("r", rank))},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_trims_the_padding_of_shorter_shards(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(init, str(tmp_path / "out")), nprocs=2, join=True)
    want = torch.cat([_rows(0), _rows(1)])  # [4, 2]: 3 rows of rank 0, then rank 1's one
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["rows"], want, rtol=0, atol=0)
        assert got["total"].tolist() == [3.0]
        assert got["objects"] == [("r", 0), ("r", 1)]

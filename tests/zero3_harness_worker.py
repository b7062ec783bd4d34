"""Under torchrun: our harness model on a ZeRO-3 engine of 2 ranks (weights partitioned: each forward gathers
them from both ranks) scoring requests that make an odd number of batches, so that the ranks get unequal
shares; rank 0 writes the scores and those of the same model on one process to the JSON file named by argv[1]."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from llm.config.schema import ModelConfig  # noqa: E402
from llm.data.tokenizer import Tokenizer  # noqa: E402
from llm.evals.harness import HarnessModel  # noqa: E402
from llm.model.gpt import GPT  # noqa: E402

out, tokenizer = sys.argv[1], Tokenizer.load(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
# a 640 x 192 embedding is over ZeRO-3's default persistence threshold (1e5 elements): it is partitioned
model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=192, max_seq_len=64)).eval()
texts = [("def f(x):\n    return ", "x" * (1 + i)) for i in range(9)]
requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(texts)]  # batches of 2: 5 for 2 ranks
alone = HarnessModel(model=model, tokenizer=tokenizer, batch_size=2)
alone.split_rank, alone.split_world = 0, 1
want = alone.loglikelihood(requests)
config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
config["zero_allow_untested_optimizer"] = True
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
assert engine.module.wte.weight.numel() == 0  # partitioned
got = HarnessModel(model=engine, tokenizer=tokenizer, batch_size=2).loglikelihood(requests)
if dist.get_rank() == 0:
    with open(out, "w") as fh:
        json.dump({"sharded": got, "alone": want}, fh)
dist.barrier()

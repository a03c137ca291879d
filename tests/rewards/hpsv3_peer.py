"""Run the hpsv3 1.0.0 package's OWN inference code on transformers 4.45.2 (``.peers-hpsv3/``).

hpsv3 pins ``transformers==4.45.2``, which cannot share a process with mmrl's pinned transformers
5, so this file is a script: ONE subprocess per test module (:class:`PeerRun`, or
:func:`run_jobs` for a one-shot call) receives a JSON list of jobs on stdin and writes one JSON
result per job. In the subprocess ``.peers-hpsv3/`` (filled by ``make install`` from
peers-hpsv3.txt) is FIRST on ``sys.path``, so ``transformers``, ``tokenizers`` and
``huggingface_hub`` are the old ones; torch, torchvision, accelerate, safetensors, numpy and PIL
come from the venv.

Jobs (each a dict with ``"mode"``):

- ``"hpsv3"``: ``HPSv3RewardInferencer(config_path=<yaml>, checkpoint_path=checkpoint,
  device="cpu")`` with a yaml equal to the package's ``HPSv3_7B.yaml`` except the base
  (``model_name_or_path = base``), float32, no flash-attention / deepspeed / reporting, then
  ``.reward(images, prompts)`` on image file paths: its ``prepare_batch`` (qwen-vl-utils resize,
  INSTRUCTION template, chat template, the 4.45.2 processor) and ``Qwen2VLRewardModelBT``.
  Keys: ``base``, ``checkpoint``, ``images`` (paths), ``prompts``, ``workdir``.
  Result: ``{"logits": [[mu, log_sigma], ...], "input_ids": [[...], ...]}``.
- ``"bt_forward"``: ``Qwen2VLRewardModelBT.from_pretrained(base, output_dim=..., rm_head_type=...,
  special_token_ids=ids)`` built the way hpsv3's ``create_model_and_processor`` builds it (tokens
  added, embeddings resized, head float32, ``load_state_dict(strict=True)`` of ``checkpoint``),
  then its forward on either given tensors (``inputs``: a ``torch.save``d dict of input_ids,
  attention_mask, pixel_values(_videos), image/video_grid_thw) or inputs built by the 4.45.2
  processor from ``texts`` + ``videos`` (``torch.save``d uint8 ``[T, 3, H, W]`` tensors, already at
  their final size) / ``images`` (paths). For VideoReward-style models:
  ``output_dim=1, rm_head_type="default", special_tokens=[...3 tokens]``.
  Result: ``{"logits": [[...], ...], "input_ids": [[...], ...]}`` (logits ``[B, n_tokens *
  output_dim]`` as the package returns them).

Imports the inference never runs (trl, peft, fire, deepspeed, pandas, datasets, matplotlib,
tensorboard) are stubbed; trl's ``get_quantization_config`` / ``get_kbit_device_map`` answer
None (no quantization), which is what trl returns for a config without 4/8-bit loading.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_HPSV3 = ROOT / ".peers-hpsv3"

_STUBS = ("trl", "peft", "fire", "deepspeed", "pandas", "datasets", "matplotlib",
          "torch.utils.tensorboard", "flash_attn")


class PeerRun:
    """The peer subprocess. It starts importing torch and hpsv3 at once and then waits for its
    jobs on stdin, so the imports overlap the test module's own set-up: start it first,
    :meth:`submit` the jobs once their files exist, collect with :meth:`results`.

    Raises:
        RuntimeError: ``.peers-hpsv3`` is missing (run ``make install``).
    """

    def __init__(self, workdir: str):
        if not (PEERS_HPSV3 / "hpsv3").is_dir() or not (PEERS_HPSV3 / "transformers").is_dir():
            raise RuntimeError(f"{PEERS_HPSV3} lacks hpsv3 / transformers 4.45.2: run `make "
                               f"install` (it installs peers-hpsv3.txt there)")
        self.out_file = os.path.join(workdir, "results.json")
        # its output goes to a file: a pipe nobody reads until the end could fill and block it
        self.log_file = os.path.join(workdir, "peer.log")
        self._log = open(self.log_file, "w")
        # one thread: the tiny models gain nothing from more, and the test process runs beside
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__, self.out_file], env=env,
                                     stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True)
        self._submitted, self._results = False, None

    def submit(self, jobs: list) -> None:
        """Hand over the jobs (a list of dicts, see the module docstring); once. They run while
        the caller goes on."""
        if self._submitted:
            raise RuntimeError("jobs were already submitted to this peer run; start another")
        self.proc.stdin.write(json.dumps(jobs))
        self.proc.stdin.close()
        self._submitted = True

    def results(self, timeout: float = 300.0) -> list:
        """One result dict per submitted job.

        Raises:
            RuntimeError: nothing submitted, or the subprocess failed (its stderr tail is in the
                message).
        """
        if self._results is None:
            if not self._submitted:
                raise RuntimeError("no jobs submitted: call submit(jobs) first")
            self.proc.wait(timeout=timeout)
            self._log.close()
            if self.proc.returncode != 0:
                with open(self.log_file) as f:
                    raise RuntimeError(f"hpsv3 peer failed (rc {self.proc.returncode}):\n"
                                       f"{f.read()[-4000:]}")
            with open(self.out_file) as f:
                self._results = json.load(f)
        return self._results

    def close(self) -> None:
        """Stop the subprocess if it still runs (a module whose tests were all deselected)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_jobs(jobs: list, workdir: str) -> list:
    """Run ``jobs`` in one subprocess with the hpsv3 stack -> one result dict per job."""
    run = PeerRun(workdir)
    run.submit(jobs)
    return run.results()


# ---------------------------------------------------------------- inside the subprocess
def _setup():
    sys.path.insert(0, str(PEERS_HPSV3))
    sys.path.insert(1, str(ROOT))  # tests.peer_stubs
    from tests.peer_stubs import StubFinder
    # trl: no 4/8-bit loading, so both of these answer None
    sys.meta_path.insert(0, StubFinder(_STUBS, {"trl": {
        "get_quantization_config": lambda model_config: None,
        "get_kbit_device_map": lambda: None}}))
    import transformers
    if transformers.__version__ != "4.45.2":
        raise RuntimeError(f"expected transformers 4.45.2 from {PEERS_HPSV3}, got "
                           f"{transformers.__version__} from {transformers.__file__}")


def _yaml(job) -> str:
    path = os.path.join(job["workdir"], "hpsv3_tiny.yaml")
    lines = {  # HPSv3_7B.yaml's model keys; the base, dtype and runtime keys changed for CPU tests
        "rm_head_type": '"ranknet"', "lora_enable": "False", "vision_lora": "False",
        "model_name_or_path": json.dumps(job["base"]), "use_special_tokens": "true",
        "reward_token": '"special"', "output_dim": "2", "loss_type": '"uncertainty"',
        "max_pixels": "200704", "min_pixels": "200704", "output_dir": json.dumps(job["workdir"]),
        "disable_flash_attn2": "True", "bf16": "False", "torch_dtype": '"float32"',
        "report_to": "none"}
    with open(path, "w") as f:
        f.writelines(f"{k}: {v}\n" for k, v in lines.items())
    return path


def _hpsv3(job) -> dict:
    import torch
    from hpsv3 import HPSv3RewardInferencer
    inf = HPSv3RewardInferencer(config_path=_yaml(job), checkpoint_path=job["checkpoint"],
                                device="cpu")
    with torch.no_grad():  # hpsv3 1.0.0's reward() leaves autograd on
        logits = inf.reward(job["images"], job["prompts"])
    ids = inf.prepare_batch(job["images"], job["prompts"])["input_ids"]
    return {"logits": logits.tolist(), "input_ids": ids.tolist()}


def _bt_forward(job) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
    processor = AutoProcessor.from_pretrained(job["base"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": job["special_tokens"]})
    ids = processor.tokenizer.convert_tokens_to_ids(job["special_tokens"])
    model = Qwen2VLRewardModelBT.from_pretrained(
        job["base"], output_dim=job["output_dim"], reward_token="special", special_token_ids=ids,
        torch_dtype=torch.float32, attn_implementation="sdpa",
        rm_head_type=job["rm_head_type"], use_cache=False)
    model.resize_token_embeddings(len(processor.tokenizer))
    model.rm_head.to(torch.float32)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    if job["checkpoint"].endswith(".safetensors"):
        import safetensors.torch
        sd = safetensors.torch.load_file(job["checkpoint"], device="cpu")
    else:
        sd = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict(sd.get("model", sd), strict=True)
    model.eval()
    if "inputs" in job:
        batch = torch.load(job["inputs"], weights_only=True)
    else:
        media = "video" if "videos" in job else "image"
        msgs = [[{"role": "user", "content": [{"type": media, media: ""},
                                              {"type": "text", "text": t}]}]
                for t in job["texts"]]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if media == "video":
            batch = processor(text=text, videos=[torch.load(v, weights_only=True)
                                                 for v in job["videos"]],
                              padding=True, return_tensors="pt")
        else:
            batch = processor(text=text, images=[Image.open(p).convert("RGB")
                                                 for p in job["images"]],
                              padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(return_dict=True, **batch)["logits"]
    return {"logits": logits.tolist(), "input_ids": batch["input_ids"].tolist()}


def main(out_file: str) -> None:
    _setup()
    import hpsv3  # noqa: F401  imported before the jobs arrive (overlaps the caller's set-up)
    jobs = json.loads(sys.stdin.read())
    modes = {"hpsv3": _hpsv3, "bt_forward": _bt_forward}
    results = []
    for job in jobs:
        if job.get("mode") not in modes:
            raise ValueError(f"job mode {job.get('mode')!r}; expected one of {sorted(modes)}")
        results.append(modes[job["mode"]](job))
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])

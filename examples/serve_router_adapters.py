"""Serve router LoRA adapters trained with PEFT, several at once, and prove they route as in PEFT.

    python examples/serve_router_adapters.py            # CPU: a small gpt-oss in fp32, a few minutes at most
    python examples/serve_router_adapters.py --quick    # fewer layers and tokens
    python examples/serve_router_adapters.py --device cuda   # gpt-oss-20b router shapes, bf16, kernel
    python examples/serve_router_adapters.py --dtype bfloat16  # the bf16 verdict on the CPU

1. Builds a gpt-oss with random weights (on CUDA: the gpt-oss-20b router, K=2880, E=32, top-4, bf16;
   on the CPU a smaller one in fp32; ``--dtype`` overrides the dtype) and patches its routers
   (moegate's GateLinear + LoRA slots).
2. Trains router adapters "math", "code", "chat" and "code_v2" with PEFT (``target_parameters=
   ["mlp.router.weight"]``) for a few steps each and saves them with PEFT, or loads them from
   ``--adapter-dir`` when they are there already.
3. Serves one batch of prompts, a different adapter per sequence (one base-model sequence too), with
   greedy decoding; halfway, another thread swaps "code" for code_v2's weights while a forward runs.
   The swap lands at the next step. Every router call's hidden states and logits are recorded.
4. End to end: replays every request through PEFT in fp32 (same adapter schedule, same tokens, its
   own KV cache) and prints per request: the adapters, the generated tokens, the largest logit
   difference, router top-k agreement over every layer and position, and whether PEFT picks the
   same tokens. In bf16 this mostly measures how far bf16 attention and experts drift the hidden
   states ahead of the routers (random weights route many tokens between near-tied experts), not the
   routers: it informs, it does not decide.
5. The routers alone: the hidden states each router call was served, with each token's adapter,
   through (a) float64 ``x @ (W + scaling * B @ A).T + bias`` with PEFT's adapter weights, (b) our
   routers' output as served, (c) PEFT's own router module in the serving dtype. Near-ties are
   tokens whose float64 gap between the k-th and (k+1)-th logit is at most NEAR_TIE_ULPS (3) units
   in the last place of the serving dtype at the token's largest |logit|: rounding may swap those
   experts.
6. The router time per call, ours and PEFT's: the whole router module, hooked alike in both.
7. Prints the next commands: ``moegate inspect`` / ``moegate verify`` of what it made (the model's
   ``config.json`` is saved next to the adapters, so ``verify --config`` rebuilds the same model).
   Without ``--adapter-dir`` it works in a temporary ``moegate_adapters_*`` directory that it
   removes at the end, saying so.

Verdict. In fp32 only summation order separates us from PEFT: end to end, ~100% top-k agreement and
identical tokens. In bf16, what we own, the routers alone: top-k sets equal to float64's at every
token and layer outside near-ties, and a largest logit error at most twice PEFT bf16's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lora.manager import AdapterManager  # noqa: E402
from moegate.transformers import GateGptOssRouter, replace_gpt_oss_routers  # noqa: E402
from moegate.verify import peft_adapter  # noqa: E402

ADAPTERS = ("math", "code", "chat", "code_v2")
REQUESTS = ("math", "code", None, "chat", "code", "math")  # adapter per sequence, None = base model
# A token is a near-tie when its float64 gap between the k-th and (k+1)-th logit is at most this many
# units in the last place of the serving dtype at the token's largest |logit|: there, rounding may
# pick either expert. In bf16 our path rounds each logit twice (the base logits, then base + adapter
# delta), half a unit each, so a gap can move by two units; the third covers the adapter weights held
# in bf16 and base logits larger than the final ones (measured: at most 1.2 units per logit). In fp32
# summation error dominates instead, and the fp32 verdict is end to end.
NEAR_TIE_ULPS = 3


def model_config(device: str, quick: bool):
    from transformers import GptOssConfig

    if device == "cuda":  # gpt-oss-20b attention and router shapes; small experts and vocabulary
        shape = dict(hidden_size=2880, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
                     num_key_value_heads=8, head_dim=64, intermediate_size=1024, vocab_size=8192)
    else:
        shape = dict(hidden_size=512, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64, intermediate_size=256, vocab_size=4096)
    layers = 2 if quick else 4
    return GptOssConfig(num_hidden_layers=layers, sliding_window=128, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                        **shape)


def train_adapters(base, directory: str, device: str, steps: int) -> dict[str, str]:
    """Each adapter learns next-token prediction on its own slice of the vocabulary (a stand-in for a
    task), starting from PEFT's init (B = 0); PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    dirs = {name: os.path.join(directory, name) for name in ADAPTERS}
    if all(os.path.isfile(os.path.join(path, "adapter_config.json")) for path in dirs.values()):
        print(f"adapters  loading {', '.join(ADAPTERS)} from {directory}")
        return dirs
    rank = 16 if device == "cuda" else 8
    vocab = base.config.vocab_size
    for index, name in enumerate(ADAPTERS):
        started = time.perf_counter()
        torch.manual_seed(100 + index)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                            target_parameters=["mlp.router.weight"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(base).float().to(device), config)
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
        low = 3 + index * (vocab - 3) // len(ADAPTERS)
        peft_model.train()
        for _ in range(steps):
            tokens = torch.randint(low, low + (vocab - 3) // len(ADAPTERS), (4, 32), device=device)
            logits = peft_model(tokens).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peft_model.save_pretrained(dirs[name])
        print(f"adapters  trained {name!r} with PEFT ({steps} steps, r={rank}, loss {loss.item():.2f}, "
              f"{time.perf_counter() - started:.1f}s) -> {dirs[name]}")
        del peft_model, optimizer
    return dirs


def cache_name(model) -> str:
    """The KV-cache argument (and output field) of this transformers version's forward: ``cache``
    from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class RouterRecorder:
    """Forward hooks on every router of a model, the module at ``…mlp.router``: ours, or PEFT's
    wrapper around transformers' router, so both timings cover a whole router call (PEFT's includes
    parametrizing the weight with the adapter, which it does per call).

    Per call: the sorted top-k ids [T, k]; with ``keep_inputs`` also the hidden states [T, K] and the
    logits [T, E]. On decode steps (``timing``), the time per call: CUDA events on the GPU, so it is
    the GPU's time; the clock on the CPU. Everything recorded is taken outside the timed span.
    """

    def __init__(self, model, device: str, keep_inputs: bool = False):
        self.device = device
        self.keep_inputs = keep_inputs
        self.calls: list[list[torch.Tensor]] = []
        self.spans: list = []
        self.timing = False
        self.handles = [h for r in routers_of(model) for h in (r.register_forward_pre_hook(self._before),
                                                                r.register_forward_hook(self._after))]

    def _now(self):
        if self.device != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _before(self, module, args):
        if self.timing:
            self.spans.append([self._now()])

    def _after(self, module, args, output):
        if self.timing:
            self.spans[-1].append(self._now())
        call = [output[-1].sort(dim=-1).values]
        if self.keep_inputs:
            x = args[0].reshape(-1, args[0].shape[-1])
            # transformers 4.55-4.57 routers return dense scores, not logits: recompute them with the
            # gate, whose adapters and mapping are still this forward's (and which is deterministic).
            call += [x.clone(), output[0] if len(output) == 3 else module.linear(x)]
        self.calls.append(call)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def take(self) -> list[list[torch.Tensor]]:
        """The calls recorded since the last take: per router call, [ids] or [ids, x, logits]."""
        calls, self.calls = self.calls, []
        return calls

    def median_us(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return statistics.median(start.elapsed_time(end) * 1e3 for start, end in self.spans)
        return statistics.median((end - start) * 1e6 for start, end in self.spans)


def routers_of(model) -> list:
    """The router modules of a gpt-oss model (ours, PEFT's wrappers or transformers'), in layer order."""
    return [module for name, module in model.named_modules() if name.endswith("mlp.router")]


def adapter_at(name: str | None, step: int, swap_at: int) -> str | None:
    """The adapter a request for ``name`` is served with at ``step``: "code" is code_v2's after the
    swap lands (the step after ``swap_at``)."""
    return "code_v2" if name == "code" and step > swap_at else name


def serve(model, manager, prompts, new_tokens: int, swap_at: int, swap_to: str, recorder):
    """Greedy decoding of the batch, one ``activate`` per step; at step ``swap_at`` a thread swaps
    "code" while the forward runs. Returns tokens [B, new], logits [B, new, V], and per step the
    recorder's calls (one per router, in layer order)."""
    first_router = next(m for m in model.modules() if isinstance(m, GateGptOssRouter))

    def swap_during_forward(module, args):
        worker = threading.Thread(target=manager.swap, args=("code", swap_to))
        worker.start()
        worker.join()  # swap() never waits for a running forward: only the registry changes now

    tokens, logits, step_calls, cache = [], [], [], None
    inputs, cache_kwarg = prompts, cache_name(model)
    with torch.no_grad():
        for step in range(new_tokens):
            # Prepended: the swap runs before the recorder starts timing this router call.
            hook = (first_router.register_forward_pre_hook(swap_during_forward, prepend=True)
                    if step == swap_at else None)
            recorder.timing = step > 0  # decode steps only
            manager.activate(REQUESTS, inputs.shape[1])
            out = model(input_ids=inputs, use_cache=True, **{cache_kwarg: cache})
            if hook is not None:
                hook.remove()
                print(f"serving   step {step}: another thread swapped 'code' to code_v2's weights while "
                      f"this step's forward ran; the swap lands at step {step + 1}")
            cache = getattr(out, cache_kwarg)
            logits.append(out.logits[:, -1].float())
            inputs = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(inputs)
            step_calls.append(recorder.take())
    recorder.timing = False
    return torch.cat(tokens, 1), torch.stack(logits, 1), step_calls


def replay_in_peft(peft_model, prompt, generated, schedule, recorder):
    """PEFT on one request: the prompt, then our tokens one by one, with the adapter ``schedule[t]``
    at step t. Returns its logits [new, V] and router ids per step."""
    logits, step_ids, cache = [], [], None
    inputs, cache_kwarg = prompt[None], cache_name(peft_model.get_base_model())
    with torch.no_grad():
        for step, name in enumerate(schedule):
            recorder.timing = step > 0
            with peft_adapter(peft_model, name):
                out = peft_model(input_ids=inputs, use_cache=True, **{cache_kwarg: cache})
            cache = getattr(out, cache_kwarg)
            logits.append(out.logits[0, -1].float())
            step_ids.append([call[0] for call in recorder.take()])
            inputs = generated[step][None, None]
    recorder.timing = False
    return torch.stack(logits), step_ids


def load_peft(base, dirs: dict[str, str], dtype: torch.dtype):
    """PEFT's model over a copy of ``base`` in ``dtype``, with every adapter loaded."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), dirs["math"], adapter_name="math")
        for name in ("code", "chat", "code_v2"):
            model.load_adapter(dirs[name], adapter_name=name)
    return model.eval()


def topk_agreement(ids, reference_ids) -> tuple[int, int]:
    """(tokens whose top-k expert sets agree, tokens), over every step and router: per step a list
    of [tokens, k] sorted ids per router."""
    agree = total = 0
    for step, reference_step in zip(ids, reference_ids):
        for mine, theirs in zip(step, reference_step):
            agree += (mine == theirs).all(-1).sum().item()
            total += theirs.shape[0]
    return agree, total


def reference_logits(wrapper, name: str | None, x: torch.Tensor) -> torch.Tensor:
    """float64 logits [T, E] of a PEFT router under adapter ``name`` (None: the base router), as
    PEFT defines them, ``x @ (W + scaling * B @ A).T + bias``, from PEFT's own fp32 weights."""
    router = wrapper.get_base_layer()
    weight = router.weight.double()
    if name is not None:
        weight = weight + wrapper.scaling[name] * (wrapper.lora_B[name].weight.double()
                                                   @ wrapper.lora_A[name].weight.double())
    return F.linear(x.double(), weight, router.bias.double())


def peft_router_logits(peft_model, wrapper, name: str | None, x: torch.Tensor) -> torch.Tensor:
    """Logits [T, E] of PEFT's router module ``wrapper`` itself, called on ``x`` under adapter ``name``."""
    logits = []

    def capture(router, args, output):
        # transformers 4.55-4.57 routers return dense scores: their logits are F.linear of the weight
        # PEFT parametrizes for the duration of the call.
        logits.append(output[0] if len(output) == 3 else F.linear(args[0], router.weight, router.bias))

    handle = wrapper.get_base_layer().register_forward_hook(capture)
    try:
        with peft_adapter(peft_model, name), torch.no_grad():
            wrapper(x)
    finally:
        handle.remove()
    return logits[0]


def check_routers_alone(step_calls, swap_at: int, reference, peft_same_dtype, top_k: int,
                        dtype: torch.dtype) -> dict:
    """Our routers alone, on the hidden states they were served (``step_calls``: per step, per
    layer, [ids, x, logits]) with each token's adapter: our top-k ids and logits against float64
    (``reference_logits``), and PEFT's router modules in ``dtype`` on the same inputs."""
    ours, ours_ids, ref, peft = [], [], [], []
    for layer, (ref_wrapper, peft_wrapper) in enumerate(zip(routers_of(reference),
                                                            routers_of(peft_same_dtype))):
        names = []
        for step, calls in enumerate(step_calls):
            ids, _, logits = calls[layer]
            per_sequence = logits.shape[0] // len(REQUESTS)  # tokens are sequence-major
            names += [adapter_at(name, step, swap_at) for name in REQUESTS for _ in range(per_sequence)]
            ours.append(logits.double())
            ours_ids.append(ids)
        x = torch.cat([calls[layer][1] for calls in step_calls])
        layer_ref = x.new_empty(x.shape[0], ref_wrapper.get_base_layer().weight.shape[0], dtype=torch.float64)
        layer_peft = torch.empty_like(layer_ref)
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            layer_ref[rows] = reference_logits(ref_wrapper, name, x[rows])
            layer_peft[rows] = peft_router_logits(peft_same_dtype, peft_wrapper, name, x[rows]).double()
        ref.append(layer_ref)
        peft.append(layer_peft)
    ours, ours_ids, ref, peft = map(torch.cat, (ours, ours_ids, ref, peft))
    top = ref.topk(top_k + 1, dim=-1).values
    largest = ref.abs().amax(-1)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(largest)))
    near_tie = top[:, top_k - 1] - top[:, top_k] <= NEAR_TIE_ULPS * ulp
    ref_ids = ref.topk(top_k, dim=-1).indices.sort(-1).values
    peft_ids = peft.topk(top_k, dim=-1).indices.sort(-1).values
    ours_error, peft_error = (ours - ref).abs(), (peft - ref).abs()
    return {"decisions": ref.shape[0], "near_ties": int(near_tie.sum()),
            "ours_disagree": int(((ours_ids != ref_ids).any(-1) & ~near_tie).sum()),
            "peft_disagree": int(((peft_ids != ref_ids).any(-1) & ~near_tie).sum()),
            "ours_max": ours_error.max().item(), "peft_max": peft_error.max().item(),
            "ours_rms": ours_error.square().mean().sqrt().item(),
            "peft_rms": peft_error.square().mean().sqrt().item()}


def graph_router_us(router, tokens: int, device: str) -> float | None:
    """µs per call of one router replayed from a CUDA graph (its kernels, no launch overhead);
    None on the CPU."""
    if device != "cuda":
        return None
    x = torch.randn(tokens, router.hidden_dim, device=device, dtype=router.weight.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        router(x)
    torch.cuda.current_stream().wait_stream(side)
    graph, calls = torch.cuda.CUDAGraph(), 50
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(calls):
            router(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the served model's dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="2 layers, fewer tokens and training steps")
    parser.add_argument("--adapter-dir", default=None,
                        help="where adapters (and the model's config.json) are saved, or loaded when there, "
                             "and kept (default: a temporary directory, removed at the end)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    new_tokens = args.new_tokens or (8 if args.quick else 16)
    started = time.perf_counter()

    from transformers import GptOssForCausalLM

    torch.manual_seed(args.seed)
    config = model_config(device, args.quick)
    with torch.device(device):
        base = GptOssForCausalLM(config).to(dtype).eval()
    print(f"model     gpt-oss, {config.num_hidden_layers} layers, router K={config.hidden_size} "
          f"E={config.num_local_experts} top-{config.num_experts_per_tok}, {device} {str(dtype)[6:]}, "
          "random weights")
    with adapter_directory(args.adapter_dir) as directory:
        config.save_pretrained(directory)  # config.json: `moegate verify --config` rebuilds this model
        passed = run_demo(args, base, config, directory, device, dtype, new_tokens, started)
        print_next_commands(directory, kept=args.adapter_dir is not None)
    return 0 if passed else 1


@contextlib.contextmanager
def adapter_directory(requested: str | None):
    """``requested`` (created if missing, kept), or a temporary ``moegate_adapters_*`` directory
    removed on the way out, whatever happens."""
    if requested is not None:
        os.makedirs(requested, exist_ok=True)
        yield requested
        return
    directory = tempfile.mkdtemp(prefix="moegate_adapters_")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"cleanup   removed the temporary {directory} (pass --adapter-dir DIR to keep the adapters)")


def print_next_commands(directory: str, kept: bool) -> None:
    where = directory if kept else "DIR"
    keep = "" if kept else "with the adapters kept (--adapter-dir DIR, scripts/demo.sh passes it on), "
    print(f"next      {keep}check one against PEFT, or serve them again:")
    print(f"            moegate inspect {os.path.join(where, 'math')}")
    print(f"            moegate verify {os.path.join(where, 'math')} --config {where} [--dtype bfloat16]")
    print(f"            python examples/serve_router_adapters.py --adapter-dir {where}")


def run_demo(args, base, config, directory: str, device: str, dtype: torch.dtype, new_tokens: int,
             started: float) -> bool:
    """Steps 2-6 of the module docstring on the adapters in ``directory``; True when the verdict passes."""
    dirs = train_adapters(base, directory, device, steps=4 if args.quick else 8)

    served = copy.deepcopy(base)
    replace_gpt_oss_routers(served)
    manager = AdapterManager(served, max_loras=3, max_rank=16)
    for name in ("math", "code", "chat"):
        manager.add(name, dirs[name])
    router = next(m for m in served.modules() if isinstance(m, GateGptOssRouter))
    print(f"serving   backend {router.linear.base_layer.backend!r}, {manager.max_loras} slots of rank "
          f"<= {manager.max_rank}; requests use {list(REQUESTS)}")

    prompts = torch.randint(3, config.vocab_size, (len(REQUESTS), 24), device=device,
                            generator=torch.Generator(device=device).manual_seed(args.seed))
    ours_recorder = RouterRecorder(served, device, keep_inputs=True)
    swap_at = new_tokens // 2
    generated, our_logits, step_calls = serve(served, manager, prompts, new_tokens, swap_at,
                                              dirs["code_v2"], ours_recorder)
    ours_recorder.close()
    our_ids = [[call[0] for call in calls] for calls in step_calls]
    print(f"serving   slots {manager.resident}, stats {manager.stats}")

    # End to end, the reference is PEFT in fp32, and PEFT's own run in the serving dtype is shown
    # beside ours.
    reference = load_peft(base, dirs, torch.float32)
    same_dtype = load_peft(base, dirs, dtype) if dtype != torch.float32 else None
    timed_peft = same_dtype or reference
    peft_recorder = RouterRecorder(timed_peft, device)
    reference_recorder = peft_recorder if timed_peft is reference else RouterRecorder(reference, device)
    rows, ours_total, peft_total = [], [0, 0], [0, 0]
    all_tokens_match = True
    for index, name in enumerate(REQUESTS):
        schedule = [adapter_at(name, step, swap_at) for step in range(new_tokens)]
        ref_logits, ref_ids = replay_in_peft(reference, prompts[index], generated[index], schedule,
                                             reference_recorder)
        mine = [[ids.view(len(REQUESTS), -1, ids.shape[-1])[index] for ids in step] for step in our_ids]
        agree, total = topk_agreement(mine, ref_ids)
        ours_total = [ours_total[0] + agree, ours_total[1] + total]
        same_tokens = torch.equal(ref_logits.argmax(-1), generated[index])
        all_tokens_match &= same_tokens
        label = "base" if name is None else ("code -> code_v2" if name == "code" else name)
        shown = " ".join(map(str, generated[index].tolist()[:8])) + (" ..." if new_tokens > 8 else "")
        row = [index, label, shown, f"{(our_logits[index] - ref_logits).abs().max().item():.2e}",
               f"{100 * agree / total:.2f}%", "yes" if same_tokens else "no"]
        if same_dtype is not None:
            _, peft_ids = replay_in_peft(same_dtype, prompts[index], generated[index], schedule,
                                         peft_recorder)
            peft_agree, _ = topk_agreement(peft_ids, ref_ids)
            peft_total = [peft_total[0] + peft_agree, peft_total[1] + total]
            row.append(f"{100 * peft_agree / total:.2f}%")
        rows.append(row)

    for recorder in {peft_recorder, reference_recorder}:  # before PEFT's routers are called alone
        recorder.close()
    alone = check_routers_alone(step_calls, swap_at, reference, timed_peft, config.num_experts_per_tok, dtype)

    header = ["req", "adapter", "generated tokens", "max |d logit|", "top-k agreement", "same tokens"]
    if same_dtype is not None:
        header.append(f"PEFT {str(dtype)[6:]}'s agreement")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print("\nend to end: each request replayed through PEFT in float32, fed our tokens: our logits, our "
          "routers' top-k expert sets (every layer, every position) and our greedy tokens against it")
    if same_dtype is not None:
        print(f"           In {str(dtype)[6:]} this measures mostly the drift of attention and experts "
              "ahead of the routers (random weights leave many experts near-tied), not the routers: it "
              "informs, the router check below decides.")
    print()
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    peft_name, decided = f"PEFT {str(dtype)[6:]}", alone["decisions"] - alone["near_ties"]
    print(f"router    alone: the {alone['decisions']} hidden states (tokens x layers) our routers were "
          "served, each with its adapter, against float64 x @ (W + scaling * B @ A).T + bias")
    print(f"          top-k agreement on the {decided} that are not near-ties ({alone['near_ties']} are: "
          f"k-th/(k+1)-th gap <= {NEAR_TIE_ULPS} {str(dtype)[6:]} ulps of the token's max |logit|): "
          f"moegate {100 * (1 - alone['ours_disagree'] / decided):.2f}%, "
          f"{peft_name} {100 * (1 - alone['peft_disagree'] / decided):.2f}%")
    print(f"          |d logit| max / rms: moegate {alone['ours_max']:.2e} / {alone['ours_rms']:.2e}, "
          f"{peft_name} {alone['peft_max']:.2e} / {alone['peft_rms']:.2e}")
    print(f"router    per call at decode (batch {len(REQUESTS)}, the whole router module: gate + LoRA + "
          f"top-k + softmax, eager): moegate {ours_recorder.median_us():.1f} us, "
          f"PEFT {peft_recorder.median_us():.1f} us")
    try:
        graph_us = graph_router_us(router, len(REQUESTS), device)
        if graph_us is not None:
            print(f"router    per call replayed from a CUDA graph: moegate {graph_us:.2f} us")
    except RuntimeError as error:  # report it; the verification below still stands
        print(f"router    CUDA graph capture of the router failed: {error}")
    ours_rate = ours_total[0] / ours_total[1]
    tokens = "identical" if all_tokens_match else "differ"
    if same_dtype is None:  # fp32: only summation order separates us from PEFT, end to end too
        passed = ours_rate >= 0.999 and all_tokens_match
        verdict = (f"top-k agreement {100 * ours_rate:.2f}% (need 99.9% and identical tokens), "
                   f"tokens {tokens}")
    else:  # what we own, the routers: the same experts as float64 wherever rounding cannot decide
        ratio = alone["ours_max"] / alone["peft_max"]
        passed = alone["ours_disagree"] == 0 and ratio <= 2
        peft_rate = peft_total[0] / peft_total[1]
        verdict = (f"routers alone: top-k = float64 in {decided - alone['ours_disagree']} of {decided} "
                   f"outside near-ties, max logit error {ratio:.2f}x {peft_name}'s (need all, and <= 2x); "
                   f"end to end (informative): top-k agreement {100 * ours_rate:.2f}% ({peft_name}: "
                   f"{100 * peft_rate:.2f}%), tokens {tokens}")
    print(f"verdict   {'PASS' if passed else 'FAIL'}: {verdict}; {time.perf_counter() - started:.0f}s in all")
    return passed


if __name__ == "__main__":
    sys.exit(main())

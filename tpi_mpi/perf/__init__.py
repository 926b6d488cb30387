"""Performance model: TTFT, token latency and peak memory per device, from the model's shapes, N, window,
links, disk and compute, each calibrated by a short measurement on the machine at hand.

    python -m tpi_mpi.perf calibrate --out calib.json      # ~3 min here: see `calibrate`
    python -m tpi_mpi.perf paper --calibration calib.json  # the paper's settings, next to its numbers
    python -m tpi_mpi.perf kernels --out kernels.json      # the weight formats' kernels alone (perf/kernels.py)

One forward pass of q tokens (q = prompt: TTFT; q = 1: a token) through L layers on N tensor-parallel ranks:

    T = P(N) + L * [ s(N) * max(2 q P_l / N / F,  B_l / N / W)          weights through one core
                     + o(N)                                             fixed cost per layer
                     + 2 * s(N) * (AR(q h 4 bytes) - AR(q h_p 4 bytes))  bigger messages than the probe's
                     + 2 * AR_emulated(q h 4 bytes) ]                   software-modelled links, if any
          + s_w(N) * V h 4 / W                                          rank 0's lm_head, the others wait
    streamed layers (memory.window): the L layer terms become max(them, L B_l / D(N)), minus, for the
    prompt, the first `window` blocks, which the prefetcher read at start-up

    P(N), o(N)  fixed cost per pass and per layer (prefill and decode each): measured by real runs of
                `tpi_mpi.run` with a model of negligible size (hidden h_p = 128) of 1 and of 4 layers at
                N = 1, 2, 4, 8, for every allreduce algorithm; linear in N between them. They hold what
                N ranks on C cores cost beyond the arithmetic: Python, kernel starts, the allreduces of small
                messages, MPICH's waiting ranks polling on the cores the others compute on, context switches
    s(N)        how much longer a rank's matrix-vector products take while all N ranks compute at once on
                this host (measured by the link probe: 1 up to N = C cores, then about N / C)
    s_w(N)      the same while the other N - 1 ranks wait in MPI (a pipeline stage, rank 0's head)
    F, W        FLOP/s of our decoder layers' prefill (whole layers, 8 distinct ones in turn so that the weights
                come from memory, as in a forward pass), bytes/s of weights through a matrix-vector product
    AR          alpha-beta fits of each allreduce (cost_model.py), alpha at N, beta at N = 2
    D(N)        aggregate cold read bandwidth of N processes reading at once from the one disk here
    P_l, B_l    parameters and bytes of one layer; V the vocabulary

On real devices (the paper's settings) there is no sharing: s = s_w = 1, P and o as measured on one process,
allreduces over the paper's links, a disk per device (D = N x its bandwidth). Without a fixed-cost calibration
(old calibration files) the per-layer cost is share(N) * (weights + o) + 2 AR with share = N / C.

Weight formats (shapes.WeightFormat): the linear weights in fp32/fp16/bf16, int8 (a bf16 scale per output row)
or int4 (a bf16 scale and zero per group of G input columns), as torch's packed kernels take them; norms and the
embedding in the checkpoint's float dtype. B_l and the head's bytes follow the format; W and F become the format's:
its kernel's bytes/s and FLOP/s measured side by side with fp32's (perf/kernels.py), as a ratio to fp32's. The
allreduce messages are comm.dtype's bytes (int8: 1.125 a value) plus its encode/decode cost; comm.algo=auto takes
the fastest algorithm (and, with comm.dtype=auto, wire). memory.budget (resident=auto) follows memplan's plan: the
window, then lm_head rows, FFN and attention blocks resident as they fit; the rest is read every pass, overlapping
the compute (the layer terms become max(them, streamed bytes / disk)).

Peak memory per device = the process's base RSS (Python, torch, MPI) + resident weights (all of the rank's
slices, or `window` layers' blocks when streaming) + rank 0's embedding and lm_head + the KV cache.

Baselines: `transformers` and `accelerate` are one process: their fixed costs measured as above (accelerate
with everything offloaded, as under the sweeps' budget) + the weights through one core; accelerate's offloaded
weights come back from the page cache here (nothing evicts them), so they cost what resident ones do;
`pipeline` runs the stages one after another, each with a core to itself (waiting stages sleep between looks
for their message): whole layers as one process computes them + the pass cost measured by real runs of
baseline=pipeline on the probe model (every stage's own pass and the N hops).
"""

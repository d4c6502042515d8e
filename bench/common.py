"""Helpers shared by the benchmarks: summary statistics and the peak memory of this process."""
import resource
import statistics


def stats(xs, nd=2):
    """median, min, max of xs, rounded to nd digits."""
    return dict(median=round(statistics.median(xs), nd), min=round(min(xs), nd), max=round(max(xs), nd))


def peak_mib():
    """Peak resident memory of this process in MiB: VmHWM, read by runtime.peak_memory (what train.py logs), else
    ru_maxrss where Linux's figure is missing (ru_maxrss of a child would include its parent's resident memory
    at fork time). Every bench script puts the repo root first on sys.path, so `runtime` is the repo's runtime.py."""
    import torch

    from runtime import peak_memory

    gib = peak_memory(torch.device("cpu")).get("mem/peak_rss_gib")
    return round(gib * 1024) if gib is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

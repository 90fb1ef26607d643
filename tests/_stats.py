"""Statistical checks shared by the distribution tests."""

import math

import torch


def assert_chi_square_fits(counts: torch.Tensor, expected: torch.Tensor, upper_z: float = 3.719) -> None:
    """Chi-square goodness of fit of observed ``counts`` to ``expected`` counts (same shape), at the upper
    ``upper_z`` normal quantile (3.719: p = 1e-4) through the Wilson-Hilferty approximation. Cells expected below 5
    are pooled into one, as the test requires."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    assert observed[-1] == 0 or expect[-1] > 0, "samples fell where the distribution has no mass"
    observed, expect = observed[expect > 0], expect[expect > 0]
    chi2 = float(((observed - expect) ** 2 / expect).sum())
    dof = observed.numel() - 1
    bound = dof * (1 - 2 / (9 * dof) + upper_z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, f"chi2={chi2:.1f} over {dof} dof exceeds {bound:.1f}"

"""Ensemble statistics of sampled masks: the uncertainty outputs.

SPEC (to implement), all numpy, ``samples`` is (N, L, *spatial) binary (uint8/bool), N samples,
L labels; outputs are (L, *spatial) unless said otherwise:
- ``probability(samples)`` float32 mean of the samples;
- ``fused_mask(samples, method="mean"|"staple", threshold=0.5)`` uint8: mean > threshold, or
  SimpleITK STAPLEImageFilter per label (foreground value 1, threshold its probability at 0.5);
- ``consistency(samples)`` uint8: voxels every sample marks foreground;
- ``ambiguity(samples)`` uint8: voxels where the samples disagree (some but not all);
- ``uncertainty(samples, kind="variance"|"entropy")`` float32: variance p(1-p) or binary
  entropy in bits of the per-voxel mean p;
- ``iou_distance(a, b)`` float: 1 - IoU, 0 when both masks are empty;
- ``sample_diversity(samples)`` -> list[float] per label: mean pairwise 1 - IoU over all N(N-1)/2
  pairs (0 for N < 2). This is the E[d(S, S')] term of the GED, the only one available without a
  reference;
- ``generalized_energy_distance(samples, references)`` -> list[float] per label:
  D2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with d = 1 - IoU (Kohl et al. 2018); references
  (M, L, *spatial). Expectations over distinct pairs for S,S' and Y,Y' (as in the reference
  implementations; document it); E[d(Y,Y')] = 0 for M = 1.
- ``volumes_ml(mask, spacing)`` -> list[float] per label: foreground voxel count x voxel volume / 1000.
"""

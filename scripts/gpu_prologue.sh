# Sourced by the GPU scripts once `out` is set: creates it, exports the run's settings and defines
# `phase NAME`, which logs the seconds since the start to $out/phases.txt. The commit is EMBER_COMMIT
# if given, else git's HEAD where the script runs; on a copied working tree that HEAD may be stale,
# so pass EMBER_COMMIT from the checkout the tree came from.
mkdir -p "$out"
export PYTHONUNBUFFERED=1 EMBER_COMMIT=${EMBER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
phase() { echo "== $1 at $(( $(date +%s) - start )) s" | tee -a "$out/phases.txt"; }

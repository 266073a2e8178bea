# Sourced by the GPU scripts once `out` is set: creates it, exports the run's settings (the commit
# from the local checkout unless EMBER_COMMIT is given: the GPU machine's git metadata may be stale),
# and defines `phase NAME`, which logs the seconds since the start to $out/phases.txt.
mkdir -p "$out"
export PYTHONUNBUFFERED=1 EMBER_COMMIT=${EMBER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
phase() { echo "== $1 at $(( $(date +%s) - start )) s" | tee -a "$out/phases.txt"; }

"""fastpred microbenchmarks (timings live here, never in tests/)."""

"""Development programs (benchmark, playground, soak) and the test harness; not part of the image."""

"""What may be fetched or unpacked: URL policy, the fetcher, the egress guard, safe tar, private folders."""

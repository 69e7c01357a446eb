"""The request layer both fronts use: validation into jobs, canvas layouts, the error table, the Triton
client and the dispatcher that admits jobs and streams them to Triton."""

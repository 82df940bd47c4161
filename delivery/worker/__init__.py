"""The worker: dispatch (broker -> delivery rows), the scheduler, the deliverer and its
sender, the retry policy, outcome recording and the poison-message recorder."""

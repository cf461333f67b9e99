"""Statistics, figures and the HTML report of a campaign, computed from its results directory
alone (manifest.json and the CSV tables of testbed.results): no lab access needed."""

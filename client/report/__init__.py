"""opd.client.report: `opd report`, a run or probe folder turned into plots and one HTML page.

build.py reads the inputs and holds the command; health.py judges a run against the method's
failure signature; plots.py draws (matplotlib, imported inside its functions); html.py writes
the page; rollout_view.py shows saved rollouts token by token; labels.py names the metrics for
people.
"""

"""opd.client.report: `opd report`, a run or probe folder turned into plots and one HTML page.

build.py holds the command; inputs.py reads the run folder (RunInputs, Series); health.py judges
a run against the method's failure signature; plots.py draws (matplotlib, imported inside its
functions) with the primitives of figures.py, and teacher_view.py / outcome_view.py draw and
write their own sections; html.py writes the page from the pieces in html_parts.py;
rollout_view.py shows saved rollouts token by token; labels.py names the metrics for people.
Imports go one way: build -> html, plots; html -> plots -> teacher_view, outcome_view; those
-> figures, html_parts; and any of them -> inputs, health, labels, which import none of them.
"""

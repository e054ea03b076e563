"""opd.client.recipes: commands built on the trainer's parts that predict and repair a pair.

probe (will OPD work?), coldstart (teacher SFT first), select-prompts (teacher-aligned prompts),
quickstart (the main job on the embedded default) and score-demo.
"""

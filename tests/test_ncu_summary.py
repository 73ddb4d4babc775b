"""benchmarks/ncu_mixed_attention.py's summary of an Nsight Compute CSV (the GPU part only runs on the device)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from ncu_mixed_attention import print_table, summarize  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')


def _row(kid, kernel, section, metric, unit, value):
    return (f'"{kid}","1","python","h","{kernel}","1","7","(384, 1, 1)","(32, 32, 1)","0","9.0","{section}",'
            f'"{metric}","{unit}","{value}"\n')


def test_summary_reads_durations_throughputs_and_stalls(tmp_path, capsys):
    fwd = "void dash::mixed_attention_fwd_sm90_kernel<__nv_bfloat16, 128, true>(dash::FwdParams)"
    csv_text = "==PROF== Connected to process 1\n" + HEADER + "".join([
        _row(0, fwd, "GPU Speed Of Light Throughput", "Duration", "us", "1,598.21"),
        _row(0, fwd, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "41.2"),
        _row(0, fwd, "Occupancy", "Achieved Occupancy", "%", "18.7"),
        _row(0, fwd, "GPU Speed Of Light Throughput", "L1/TEX Cache Throughput", "%", "31.9"),
        _row(0, fwd, "Warp State Statistics", "Avg. Active Threads Per Warp", "", "31.52"),
        _row(0, fwd, "Command line profiler metrics",
             "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "3.5"),
        _row(0, fwd, "Command line profiler metrics",
             "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "1.25"),
        _row(0, fwd, "Command line profiler metrics",
             "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio", "", "n/a"),
        _row(1, "dash_bwd_kernel(float*)", "GPU Speed Of Light Throughput", "Duration", "ms", "4.93"),
    ])
    path = tmp_path / "ncu.csv"
    path.write_text(csv_text)
    table = summarize(str(path), str(tmp_path / "ncu.json"))
    fwd_row = table["0:dash::mixed_attention_fwd_sm90_kernel"]
    assert fwd_row["duration (us)"] == "1,598.21" and fwd_row["sm_%"] == "41.2" and fwd_row["occupancy_%"] == "18.7"
    assert fwd_row["top stalls"] == "barrier 3.5, long_scoreboard 1.2"
    assert table["1:dash_bwd_kernel"]["duration (ms)"] == "4.93"
    print_table(table)
    out = capsys.readouterr().out
    # COLUMNS' order, the stalls last
    assert out.splitlines()[0] == ("| kernel | duration (ms) | duration (us) | sm_% | l1_% | occupancy_% | "
                                   "threads/warp | top stalls |")
    assert fwd_row["l1_%"] == "31.9" and fwd_row["threads/warp"] == "31.52" and "barrier 3.5" in out
    assert (tmp_path / "ncu.json").exists()

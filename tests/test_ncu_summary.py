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


def test_source_view_summary_counts_opcodes_and_ranks_instructions(tmp_path):
    from ncu_source import opcode, read_rows, summarize as summarize_source

    path = tmp_path / "sass.csv"
    path.write_text(
        '==PROF== something\n'
        '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n'
        '"0x10","@P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24","30","1,000"\n'
        '"0x20","FFMA R1, R2, R3, R4","10","4000"\n'
        '"0x30","@!P1 FMNMX R1, R2, R3, !PT","0","3000"\n'
        '"0x40","FFMA R5, R6, R7, R8","0","2000"\n')
    assert opcode("@!P1 FMNMX R1, R2, R3, !PT") == "FMNMX"
    summary = summarize_source(read_rows(str(path)))
    assert summary["instructions_executed"] == 10000
    assert summary["by_opcode"]["FFMA"]["share"] == 0.6  # both FFMA rows, 6000 of 10000
    assert list(summary["by_opcode"]) == ["FFMA", "FMNMX", "HGMMA"]
    assert summary["top_executed"][0]["source"].startswith("FFMA R1")
    assert summary["top_stalled"][0]["source"].startswith("@P0 HGMMA") and summary["top_stalled"][0]["stall_share"] == 0.75


def test_source_view_summary_names_a_csv_without_the_columns(tmp_path):
    import pytest
    from ncu_source import read_rows

    path = tmp_path / "bad.csv"
    path.write_text("==ERROR== no report\n")
    with pytest.raises(SystemExit, match="no source-view rows"):
        read_rows(str(path))

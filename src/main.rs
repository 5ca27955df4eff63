fn main() -> std::process::ExitCode {
    agent_vm::cli::main()
}

// Greedy generation in llama.cpp (node-llama-cpp's prebuilt binary): the prompt's token ids, the generated ids and
// text, and why generation stopped. argv: model.gguf, prompt (special tokens as text), max tokens.
const {getLlama, LlamaCompletion} = await import(process.env.NODE_LLAMA_CPP);
const [modelPath, prompt, maxTokens] = [process.argv[2], process.argv[3], Number(process.argv[4])];
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, threads: 2});
const completion = new LlamaCompletion({contextSequence: context.getSequence()});
const promptIds = model.tokenize(prompt, true);
const generated = [];
const out = await completion.generateCompletionWithMeta(promptIds, {
    maxTokens, temperature: 0, onToken: (tokens) => generated.push(...tokens),
});
console.log(JSON.stringify({
    prompt_ids: Array.from(promptIds), generated_ids: generated, text: out.response,
    stop_reason: out.metadata.stopReason, eos: model.tokens.eos, eot: model.tokens.eot,
}));
